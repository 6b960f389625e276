"""Capacity model: one GRPO step's generate / train / sync seconds at scale, full weights vs a LoRA adapter.

Why: today every RL step sends the student's full weights from learner rank 0 through Ray's object store to every
rollout actor. Whether that matters at 7B-32B, and what an adapter-only sync (LoRA) or a GPU collective would save,
cannot be measured on this CPU box; this script estimates it from the model's shape and per-token costs, each a
named constant below with where its value comes from (measured here, benchmarks/results/gpu_learner_h100_*.txt,
vendor specs, or a GUESS, marked as such).

Per step (one GRPO batch: --prompts x --group-size sequences of --prompt-tokens + --response-tokens):

  generate  decode is memory-bandwidth bound: one decode step of a batch of B sequences reads the weights once
            plus each sequence's KV cache, so tokens/s per GPU = B x HBM_BW x HBM_EFFICIENCY / (weight bytes +
            B x context x KV bytes per token), capped by compute (2 x params FLOPs per token at DECODE_MFU);
            the prefill is compute bound (2 x params FLOPs per prompt token at PREFILL_MFU).
  train     6 x params FLOPs per trained token (forward + backward) / (peak FLOPs x MFU x learner GPUs).
  sync      object store (the present design, driver-less: rank 0 copies its weights to host memory and puts them
            once, each rollout node pulls one copy over its link, each engine copies its copy to its GPUs), or a
            collective broadcast (NCCL from rank 0 to every engine's GPUs: NVLink within a node, the network link
            between nodes; pipelined, so its time hardly depends on the number of receivers).

With --measure it also times the object-store path here (put once in one actor, get + copy into place in 1 and 2
other actors) at the tiny shape and at the 0.5B Qwen2 shape, full weights vs the r=16 adapter, and prints model vs
measured side by side, plus the H100 learner figure.

Run: PYTHONPATH=. .venv/bin/python benchmarks/capacity_model.py [--measure] [--help]
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

GB = 1e9
GBIT = 1e9 / 8  # bytes per second in one Gb/s

# --- Hardware: one H100 SXM node (vendor specs unless marked) ---------------------------------------------------
HBM_BYTES_PER_S = 3.35e12  # vendor spec: H100 SXM5 80GB HBM3
PEAK_BF16_FLOPS = 989e12  # vendor spec: H100 SXM5 dense bf16 (no sparsity)
GPU_MEMORY_BYTES = 80e9  # vendor spec: H100 80GB
GPUS_PER_NODE = 8  # vendor spec: HGX/DGX H100
NVLINK_BYTES_PER_S = 450e9  # vendor spec: NVLink 4, 900 GB/s per GPU both directions -> 450 GB/s one way
PCIE_BYTES_PER_S = 64e9  # vendor spec: PCIe Gen5 x16, one direction (host <-> GPU copies)
PCIE_EFFICIENCY = 0.8  # GUESS: pinned-memory copies reach ~50 of the 64 GB/s
NCCL_EFFICIENCY = 0.8  # GUESS: bus bandwidth a large NCCL broadcast reaches, as a share of the link's
HOST_COPY_BYTES_PER_S = 10e9  # GUESS: one host-memory copy stream on a GPU node (object-store put, get + copy)
NODE_MEMORY_BYTES_PER_S = 200e9  # GUESS: what a 2-socket DDR5 GPU node's concurrent copies share (~1/3 of peak)
LINK_GBITS = (100, 400)  # the node links compared (Ethernet or InfiniBand NICs; 400 = one ConnectX-7 port)
LINK_EFFICIENCY = 0.8  # GUESS: payload share of a link's line rate for Ray's object transfer and NCCL alike

# --- Object store, measured here (capacity_model.py --measure, 2026-12-07, 2 shared cores; 0.5B bf16, 1 puller) --
TORCH_PUT_BYTES_PER_S = 0.25e9  # a {name: torch tensor} dict, as weights_ref puts it today: pickled (3.7 s / 942 MiB)
TORCH_GET_BYTES_PER_S = 0.8e9  # ... and got + copied into place by the puller (1.2 s / 942 MiB): not zero-copy
OBJECT_STORE_OVERHEAD_S = 0.004  # a tiny sync's fixed cost (numpy views, 1 puller: 2.8-4.6 ms in 3 runs)
VLLM_RELOAD_OVERHEAD_S = 0.03  # GUESS from rl_cpu_2026-12-02.txt: a tiny model's sync through vLLM's reload_weights
# takes 36 ms (1 actor), ~30 ms more than the object store alone; the in-place reload's fixed cost per sync

# --- Per-token costs ----------------------------------------------------------------------------------------------
H100_0P5B_BF16_TOKENS_PER_S = 37061  # gpu_learner_h100_2026-11-25.txt: ZeRO-2 bf16, level none, 1 H100
TRAIN_FLOPS_PER_PARAM_TOKEN = 6  # forward (2) + backward (4) per parameter per token (Kaplan et al. 2020)
DECODE_FLOPS_PER_PARAM_TOKEN = 2  # forward only
MFU_SMALL_MEASURED = H100_0P5B_BF16_TOKENS_PER_S * TRAIN_FLOPS_PER_PARAM_TOKEN * 494_032_768 / PEAK_BF16_FLOPS
# ^ 0.111: the H100 file's 0.5B bf16 learner (494.0M params), used for models under 1B
MFU_LARGE_GUESS = 0.35  # GUESS: ZeRO-3 bf16 MFU of 1.5B+ models at long sequences (reports say 30-45%)
DECODE_BATCH = 128  # GUESS: sequences a vLLM engine decodes at once per GPU (its max_num_seqs is 256 by default)
HBM_EFFICIENCY = 0.6  # GUESS: share of HBM bandwidth a decode step reaches (kernel, scheduler and sampling gaps)
DECODE_MFU = 0.3  # GUESS: compute ceiling of decode once batches are large
PREFILL_MFU = 0.4  # GUESS
ROLLOUT_WEIGHT_SHARE = 0.5  # GUESS: the most of a GPU's memory an engine gives its weights (the rest: KV cache)
LEARNER_BYTES_PER_PARAM = 16  # bf16 weights + grads (4) + fp32 master weights and two Adam moments (12), ZeRO-3
LEARNER_MEMORY_SHARE = 0.6  # GUESS: the share of GPU memory ZeRO-3 states may take (the rest: activations)
SYNC_BYTES_PER_PARAM = 2  # bf16, the dtype the rollout engines serve
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # attention + MLP


@dataclass(frozen=True)
class Qwen2Shape:
    """A Qwen2 decoder's shape: all the model needs to count parameters and bytes."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    tie_embeddings: bool

    @property
    def kv_dim(self) -> int:
        return self.hidden_size // self.num_heads * self.num_kv_heads


# config.json of Qwen/Qwen2.5-{0.5B,1.5B,7B,14B,32B} on the Hugging Face hub (recalled: nothing can be downloaded
# here). Checks: the 0.5B is the H100 file's model line exactly (494.0M params); the counts these give (494.0M,
# 1.54B, 7.62B, 14.77B, 32.76B) are the model cards' 0.49B, 1.54B, 7.61B, 14.7B, 32.5B, and 32,763,876,352 exactly
# for the 32B as counted elsewhere; the unit test builds each with transformers on the meta device and compares.
QWEN2_SHAPES = {
    "0.5B": Qwen2Shape("0.5B", 896, 24, 14, 2, 4864, 151936, tie_embeddings=True),
    "1.5B": Qwen2Shape("1.5B", 1536, 28, 12, 2, 8960, 151936, tie_embeddings=True),
    "7B": Qwen2Shape("7B", 3584, 28, 28, 4, 18944, 152064, tie_embeddings=False),
    "14B": Qwen2Shape("14B", 5120, 48, 40, 8, 13824, 152064, tie_embeddings=False),
    "32B": Qwen2Shape("32B", 5120, 64, 40, 8, 27648, 152064, tie_embeddings=False),
}
# bench_sync.py's / bench_learner.py's tiny spec (pear_ray.models.TinyModelSpec, untied, vocab 384).
TINY_SHAPE = Qwen2Shape("tiny", 128, 4, 4, 4, 256, 384, tie_embeddings=False)
# bench_rl.py's: the default TinyModelSpec, whose syncs rl_cpu_2026-12-02.txt measured (fp32).
BENCH_RL_SHAPE = Qwen2Shape("bench_rl tiny", 64, 2, 2, 2, 128, 384, tie_embeddings=False)


def projection_shapes(shape: Qwen2Shape) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each LoRA-targetable linear layer of one decoder layer."""
    h, kv, inter = shape.hidden_size, shape.kv_dim, shape.intermediate_size
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


def full_tensor_shapes(shape: Qwen2Shape) -> dict[str, tuple[int, ...]]:
    """The model's state dict as {Hugging Face name: shape}: what a full-weight sync sends (q/k/v have biases)."""
    h = shape.hidden_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (shape.vocab_size, h)}
    attention = ("q_proj", "k_proj", "v_proj", "o_proj")
    for i in range(shape.num_layers):
        for proj, (d_in, d_out) in projection_shapes(shape).items():
            block = "self_attn" if proj in attention else "mlp"
            out[f"model.layers.{i}.{block}.{proj}.weight"] = (d_out, d_in)
            if proj in ("q_proj", "k_proj", "v_proj"):
                out[f"model.layers.{i}.{block}.{proj}.bias"] = (d_out,)
        out[f"model.layers.{i}.input_layernorm.weight"] = (h,)
        out[f"model.layers.{i}.post_attention_layernorm.weight"] = (h,)
    out["model.norm.weight"] = (h,)
    if not shape.tie_embeddings:
        out["lm_head.weight"] = (shape.vocab_size, h)
    return out


def lora_tensor_shapes(shape: Qwen2Shape, rank: int, targets: tuple[str, ...] = LORA_TARGETS
                       ) -> dict[str, tuple[int, int]]:
    """The adapter's tensors as peft names them: lora_A (rank x in) and lora_B (out x rank) per targeted linear."""
    out = {}
    for i in range(shape.num_layers):
        for proj, (d_in, d_out) in projection_shapes(shape).items():
            if proj in targets:
                block = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                prefix = f"base_model.model.model.layers.{i}.{block}.{proj}"
                out[f"{prefix}.lora_A.weight"] = (rank, d_in)
                out[f"{prefix}.lora_B.weight"] = (d_out, rank)
    return out


def param_count(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes.values())


def full_param_count(shape: Qwen2Shape) -> int:
    return param_count(full_tensor_shapes(shape))


def lora_param_count(shape: Qwen2Shape, rank: int, targets: tuple[str, ...] = LORA_TARGETS) -> int:
    return param_count(lora_tensor_shapes(shape, rank, targets))


@dataclass(frozen=True)
class Workload:
    """One GRPO step's batch. Default: a GUESS at a typical math-RL step (64 prompts x 8 samples, 1K responses)."""

    prompts: int = 64
    group_size: int = 8
    prompt_tokens: int = 256
    response_tokens: int = 1024

    @property
    def sequences(self) -> int:
        return self.prompts * self.group_size


@dataclass(frozen=True)
class Layout:
    """GPUs per role; learner and rollout GPUs share a node only when both fit in one."""

    rollout_gpus: int
    learner_gpus: int

    @property
    def one_node(self) -> bool:
        return self.rollout_gpus + self.learner_gpus <= GPUS_PER_NODE

    @property
    def rollout_nodes(self) -> int:
        return math.ceil(self.rollout_gpus / GPUS_PER_NODE)


def rollout_tp(shape: Qwen2Shape) -> int:
    """GPUs per vLLM engine: the smallest power of two whose memory holds the weights in ROLLOUT_WEIGHT_SHARE."""
    tp = 1
    while full_param_count(shape) * SYNC_BYTES_PER_PARAM / tp > ROLLOUT_WEIGHT_SHARE * GPU_MEMORY_BYTES:
        tp *= 2
    return tp


def min_learner_gpus(shape: Qwen2Shape) -> int:
    """GPUs ZeRO-3 needs to hold weights, gradients and Adam states in LEARNER_MEMORY_SHARE of each GPU; whole
    nodes once it needs more than one."""
    gpus = math.ceil(full_param_count(shape) * LEARNER_BYTES_PER_PARAM / (LEARNER_MEMORY_SHARE * GPU_MEMORY_BYTES))
    return gpus if gpus <= GPUS_PER_NODE else math.ceil(gpus / GPUS_PER_NODE) * GPUS_PER_NODE


def train_mfu(shape: Qwen2Shape) -> float:
    return MFU_SMALL_MEASURED if full_param_count(shape) < 1e9 else MFU_LARGE_GUESS


def decode_tokens_per_s_per_gpu(shape: Qwen2Shape, batch: int, context: float) -> float:
    """Memory-bound decode (weights once per step + every sequence's KV cache), capped by compute; per GPU, so
    independent of the engine's tensor parallelism."""
    params = full_param_count(shape)
    weight_bytes = params * SYNC_BYTES_PER_PARAM
    kv_bytes_per_token = 2 * shape.num_layers * shape.kv_dim * SYNC_BYTES_PER_PARAM  # K and V, bf16
    memory_bound = batch * HBM_BYTES_PER_S * HBM_EFFICIENCY / (weight_bytes + batch * context * kv_bytes_per_token)
    compute_bound = PEAK_BF16_FLOPS * DECODE_MFU / (DECODE_FLOPS_PER_PARAM_TOKEN * params)
    return min(memory_bound, compute_bound)


def generate_seconds(shape: Qwen2Shape, work: Workload, rollout_gpus: int) -> float:
    params = full_param_count(shape)
    engines = max(1, rollout_gpus // rollout_tp(shape))
    batch = min(DECODE_BATCH * rollout_tp(shape), math.ceil(work.sequences / engines)) / rollout_tp(shape)
    context = work.prompt_tokens + work.response_tokens / 2  # mean context over a response
    decode = work.sequences * work.response_tokens / (decode_tokens_per_s_per_gpu(shape, batch, context)
                                                      * rollout_gpus)
    prefill = (work.sequences * work.prompt_tokens * DECODE_FLOPS_PER_PARAM_TOKEN * params
               / (PEAK_BF16_FLOPS * PREFILL_MFU * rollout_gpus))
    return decode + prefill


def train_seconds(shape: Qwen2Shape, work: Workload, learner_gpus: int) -> float:
    tokens = work.sequences * (work.prompt_tokens + work.response_tokens)
    flops = tokens * TRAIN_FLOPS_PER_PARAM_TOKEN * full_param_count(shape)
    return flops / (PEAK_BF16_FLOPS * train_mfu(shape) * learner_gpus)


def object_store_sync_seconds(nbytes: float, layout: Layout, tp: int, link_bytes_per_s: float,
                              host_copy_bytes_per_s: float = HOST_COPY_BYTES_PER_S,
                              node_memory_bytes_per_s: float = NODE_MEMORY_BYTES_PER_S,
                              pcie_bytes_per_s: float = PCIE_BYTES_PER_S * PCIE_EFFICIENCY,
                              pickled: bool = False, reload_overhead_s: float = VLLM_RELOAD_OVERHEAD_S) -> float:
    """Driver-less object-store sync: rank 0 copies GPU -> host and puts once (one copy stream); each rollout node
    other than the learner's pulls one copy, all from the learner node's link (Ray pulls from where the object is:
    the conservative case); on each node every engine gets its copy and copies it into place through host memory
    (one stream each, all sharing the node's memory bandwidth), then host -> GPU (each of its tp GPUs loads its
    shard over its own PCIe link). `pickled`: the payload is a dict of torch tensors (today's weights_ref), which
    Ray pickles in band, at the measured TORCH_PUT / TORCH_GET rates instead of copy speed; otherwise the same
    bytes as numpy views (out of band, zero-copy get)."""
    put_bytes_per_s = TORCH_PUT_BYTES_PER_S if pickled else host_copy_bytes_per_s
    get_bytes_per_s = TORCH_GET_BYTES_PER_S if pickled else host_copy_bytes_per_s
    export = OBJECT_STORE_OVERHEAD_S + nbytes / pcie_bytes_per_s + nbytes / put_bytes_per_s
    remote_nodes = 0 if layout.one_node else layout.rollout_nodes
    network = remote_nodes * nbytes / link_bytes_per_s
    engines_per_node = max(1, min(layout.rollout_gpus, GPUS_PER_NODE) // tp)
    load = (max(nbytes / get_bytes_per_s, engines_per_node * nbytes / node_memory_bytes_per_s)
            + nbytes / tp / pcie_bytes_per_s + reload_overhead_s)
    return export + network + load


def broadcast_sync_seconds(nbytes: float, layout: Layout, link_bytes_per_s: float) -> float:
    """NCCL broadcast from rank 0's GPU to every engine worker's GPU (vLLM's `nccl` weight_transfer backend): a
    pipelined ring, so ~bytes / the slowest link crossed, then each worker's load_weights copies on the GPU."""
    link = NVLINK_BYTES_PER_S * NCCL_EFFICIENCY if layout.one_node else link_bytes_per_s
    return nbytes / link + 2 * nbytes / HBM_BYTES_PER_S + VLLM_RELOAD_OVERHEAD_S


def step_rows(work: Workload, rollout_gpus: int, learner_gpus: int, lora_rank: int) -> list[dict]:
    """One row per (model size, full or LoRA): generate and train seconds, sync seconds per transport and link."""
    rows = []
    for shape in QWEN2_SHAPES.values():
        learners = max(learner_gpus, min_learner_gpus(shape))
        layout = Layout(rollout_gpus, learners)
        tp = rollout_tp(shape)
        gen, train = generate_seconds(shape, work, rollout_gpus), train_seconds(shape, work, learners)
        for label, params in (("full", full_param_count(shape)), (f"LoRA r{lora_rank}",
                                                                   lora_param_count(shape, lora_rank))):
            nbytes = params * SYNC_BYTES_PER_PARAM
            syncs = {f"os {g}G": object_store_sync_seconds(nbytes, layout, tp, g * GBIT * LINK_EFFICIENCY)
                     for g in LINK_GBITS}
            slowest = min(LINK_GBITS)
            syncs[f"today {slowest}G"] = object_store_sync_seconds(nbytes, layout, tp, slowest * GBIT * LINK_EFFICIENCY,
                                                                   pickled=True)
            syncs["nccl"] = broadcast_sync_seconds(nbytes, layout, max(LINK_GBITS) * GBIT * LINK_EFFICIENCY)
            rows.append({"size": shape.name, "weights": label, "bytes": nbytes, "tp": tp, "learners": learners,
                         "one_node": layout.one_node, "generate": gen, "train": train, **syncs})
    return rows


def print_step_table(work: Workload, rollout_gpus: int, learner_gpus: int, lora_rank: int) -> None:
    rows = step_rows(work, rollout_gpus, learner_gpus, lora_rank)
    sync_keys = [k for k in rows[0] if k.startswith(("os ", "today ")) or k == "nccl"]
    share_keys = [f"today {min(LINK_GBITS)}G", f"os {max(LINK_GBITS)}G", "nccl"]
    print(f"\n{rollout_gpus} rollout GPUs, learner GPUs >= {learner_gpus} (ZeRO-3 minimum where larger); "
          f"{work.prompts} prompts x {work.group_size} samples, {work.prompt_tokens} + {work.response_tokens} tokens")
    print(f"{'size':>5} {'weights':>9} {'sync GB':>9} {'tp':>2} {'learn':>5} {'gen s':>7} {'train s':>7} "
          + " ".join(f"{k + ' s':>9}" for k in sync_keys)
          + "".join(f" {'% ' + k:>11}" for k in share_keys))
    for r in rows:
        base = r["generate"] + r["train"]
        shares = [100 * r[k] / (base + r[k]) for k in share_keys]
        where = f"{r['learners']}*" if r["one_node"] else f"{r['learners']}"
        print(f"{r['size']:>5} {r['weights']:>9} {r['bytes'] / GB:9.4f} {r['tp']:>2} {where:>5} "
              f"{r['generate']:7.1f} {r['train']:7.1f} " + " ".join(f"{r[k]:9.3f}" for k in sync_keys)
              + "".join(f" {s:10.2f}%" for s in shares))


def print_lora_ratios(ranks: list[int]) -> None:
    """The issue's goal: an adapter sync of at most 1% of the full-weight bytes at the 0.5B shape; at 0.5B also for
    narrower target sets, since the 1% holds there only at small ranks over all seven projections."""
    print("\nLoRA adapter bytes / full-weight bytes (same dtype; goal at 0.5B: <= 1%); targets: all = "
          + "+".join(LORA_TARGETS) + ", every layer")
    print(f"{'size':>5} {'targets':>8} {'full params':>14} " + " ".join(f"{f'r={r}':>19}" for r in ranks))
    target_sets = {"all": LORA_TARGETS, "attn": LORA_TARGETS[:4], "q+v": ("q_proj", "v_proj")}
    for shape in QWEN2_SHAPES.values():
        full = full_param_count(shape)
        for label, targets in target_sets.items():
            if label != "all" and shape.name != "0.5B":
                continue
            cells = [f"{lora_param_count(shape, r, targets):>11,} {100 * lora_param_count(shape, r, targets) / full:6.3f}%"
                     for r in ranks]
            print(f"{shape.name:>5} {label:>8} {full:>14,} " + " ".join(f"{c:>19}" for c in cells))


def print_assumptions() -> None:
    print("Assumptions (named constants in benchmarks/capacity_model.py; GUESS = not measured, not a vendor spec):")
    print(f"  H100 SXM: HBM {HBM_BYTES_PER_S / 1e12:.2f} TB/s, bf16 dense {PEAK_BF16_FLOPS / 1e12:.0f} TFLOPS, "
          f"{GPU_MEMORY_BYTES / GB:.0f} GB, {GPUS_PER_NODE}/node, NVLink {NVLINK_BYTES_PER_S / GB:.0f} GB/s one way, "
          f"PCIe Gen5 {PCIE_BYTES_PER_S / GB:.0f} GB/s one way (vendor specs)")
    print(f"  train MFU {MFU_SMALL_MEASURED:.3f} under 1B (H100 file: 0.5B bf16 ZeRO-2 "
          f"{H100_0P5B_BF16_TOKENS_PER_S} tok/s), {MFU_LARGE_GUESS} from 1.5B (GUESS); "
          f"{TRAIN_FLOPS_PER_PARAM_TOKEN} x params FLOPs per trained token (prompt + response)")
    print(f"  decode: batch {DECODE_BATCH}/GPU, HBM efficiency {HBM_EFFICIENCY}, compute cap MFU {DECODE_MFU}, "
          f"prefill MFU {PREFILL_MFU} (GUESSES); engine tp: weights <= {ROLLOUT_WEIGHT_SHARE:.0%} of a GPU (GUESS)")
    print(f"  learner GPUs >= params x {LEARNER_BYTES_PER_PARAM} B / ({LEARNER_MEMORY_SHARE:.0%} of 80 GB) (ZeRO-3 "
          f"states; share a GUESS); sync dtype bf16 ({SYNC_BYTES_PER_PARAM} B/param)")
    print(f"  links: efficiency {LINK_EFFICIENCY} of line rate, NCCL {NCCL_EFFICIENCY} of NVLink, PCIe "
          f"{PCIE_EFFICIENCY}, host copy {HOST_COPY_BYTES_PER_S / GB:.0f} GB/s per stream, "
          f"{NODE_MEMORY_BYTES_PER_S / GB:.0f} GB/s per node (GUESSES); object store pulls "
          "every remote node's copy from the learner node's link; nccl column over the 400G link (NVLink in 1 node)")
    print(f"  object store, measured here: a pickled torch-tensor dict puts at {TORCH_PUT_BYTES_PER_S / GB:.2f} GB/s and "
          f"gets + copies at {TORCH_GET_BYTES_PER_S / GB:.1f} GB/s (2-core box: a GPU node's cores are faster), "
          f"{OBJECT_STORE_OVERHEAD_S * 1e3:.0f} ms fixed per sync; vLLM reload {VLLM_RELOAD_OVERHEAD_S * 1e3:.0f} ms "
          "fixed per sync (GUESS from rl_cpu_2026-12-02.txt), in every sync column")
    print("  learner and rollout GPUs share a node only when both fit in one (learn column: learner GPUs, * = that "
          "node); LoRA rows change only the sync: LoRA's cheaper backward (no weight gradients) and its "
          "slower decode kernels are not priced")


# --- Measured here: the object-store path at small sizes -------------------------------------------------------


def measure_copy_bandwidth(nbytes: int = 256 * 2**20) -> float:
    """One memory copy's bandwidth on this machine (the model's HOST_COPY constant, measured here)."""
    import torch

    src, dst = torch.ones(nbytes // 2, dtype=torch.bfloat16), torch.empty(nbytes // 2, dtype=torch.bfloat16)
    dst.copy_(src)
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def measure_object_store(cases: dict[str, dict[str, tuple[int, ...]]], actor_counts: tuple[int, ...],
                         formats: tuple[str, ...], zero_copy_torch: bool = False
                         ) -> dict[tuple[str, str, int], dict[str, float]]:
    """Per case, payload format and actor count: one actor puts the bf16 tensors once, each puller gets them and
    copies them into preallocated tensors (as a reload would); the driver only passes the ref along. Formats:
    "torch" puts the {name: tensor} dict as the learner's weights_ref does today; "numpy" puts int16 views of the
    same bytes ({name: ndarray}), which Ray serialises out of band and gets zero-copy. `zero_copy_torch`: the
    actors run with RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1 (Ray's own uint8-view reducer for torch tensors, off by
    default), the format labelled "torch0c". Median of 3 rounds."""
    import statistics
    import warnings

    import ray
    import torch

    @ray.remote(num_cpus=0)
    class Source:
        def publish(self, shapes: dict[str, tuple[int, ...]], fmt: str) -> tuple[list, float]:
            tensors = {name: torch.randn(s, dtype=torch.bfloat16) for name, s in shapes.items()}
            t0 = time.perf_counter()
            payload = tensors if fmt == "torch" else {n: t.view(torch.int16).numpy() for n, t in tensors.items()}
            ref = ray.put(payload)
            return [ref], time.perf_counter() - t0  # nested: the driver never fetches the tensors

    @ray.remote(num_cpus=0)
    class Puller:
        def prepare(self, shapes: dict[str, tuple[int, ...]]) -> None:
            self.buffers = {name: torch.empty(s, dtype=torch.bfloat16) for name, s in shapes.items()}

        def pull(self, wrapped: list) -> float:
            t0 = time.perf_counter()
            payload = ray.get(wrapped[0])
            with warnings.catch_warnings():  # zero-copy arrays are read-only; copy_ only reads them
                warnings.simplefilter("ignore", UserWarning)
                for name, value in payload.items():
                    tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(value).view(torch.bfloat16)
                    self.buffers[name].copy_(tensor)
            return time.perf_counter() - t0

    env = {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"} if zero_copy_torch else {}
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", runtime_env={"env_vars": env})
    try:
        source = Source.remote()
        pullers = [Puller.remote() for _ in range(max(actor_counts))]
        out = {}
        for case, shapes in cases.items():
            ray.get([p.prepare.remote(shapes) for p in pullers])
            for fmt in formats:
                for n in actor_counts:
                    walls, puts = [], []
                    for _ in range(3):
                        wrapped, put = ray.get(source.publish.remote(shapes, fmt))
                        gets = ray.get([p.pull.remote(wrapped) for p in pullers[:n]])
                        walls.append(put + max(gets))
                        puts.append(put)
                        del wrapped
                    label = "torch0c" if zero_copy_torch and fmt == "torch" else fmt
                    out[case, label, n] = {"bytes": 2 * param_count(shapes), "put": statistics.median(puts),
                                         "sync": statistics.median(walls)}
        return out
    finally:
        ray.shutdown()


def print_measured(rank: int) -> None:
    """Model vs measured where this box can compare: the object-store sync on one node, the H100 learner."""
    copy_bw = measure_copy_bandwidth()
    half = QWEN2_SHAPES["0.5B"]
    cases = {"tiny full": full_tensor_shapes(TINY_SHAPE), f"tiny LoRA r{rank}": lora_tensor_shapes(TINY_SHAPE, rank),
             "0.5B full": full_tensor_shapes(half), f"0.5B LoRA r{rank}": lora_tensor_shapes(half, rank)}
    measured = measure_object_store(cases, (1, 2), formats=("torch", "numpy"))
    measured |= measure_object_store(cases, (1, 2), formats=("torch",), zero_copy_torch=True)
    print(f"\nModel vs measured: object-store sync on this box (one node, no GPU, no network: put + get + copy into "
          f"place; bf16; measured host copy {copy_bw / GB:.1f} GB/s used as the model's HOST_COPY)")
    print(f"{'case':>14} {'format':>6} {'actors':>6} {'MB':>9} {'put s':>8} {'measured s':>10} {'model s':>8} "
          f"{'model/meas':>10}")
    for (case, fmt, n), m in measured.items():
        predicted = object_store_sync_seconds(m["bytes"], Layout(rollout_gpus=n, learner_gpus=1), tp=1,
                                              link_bytes_per_s=math.inf, host_copy_bytes_per_s=copy_bw,
                                              node_memory_bytes_per_s=copy_bw, pcie_bytes_per_s=math.inf,
                                              pickled=fmt == "torch", reload_overhead_s=0.0)
        print(f"{case:>14} {fmt:>6} {n:>6} {m['bytes'] / 2**20:9.3f} {m['put']:8.4f} {m['sync']:10.4f} {predicted:8.4f} "
              f"{predicted / m['sync']:10.2f}")
    print("model here = overhead + put + n actors' get-and-copy, serial (one copy stream fills this box's memory "
          "bandwidth): numpy and torch0c at the copy bandwidth measured above, torch at the TORCH_PUT / TORCH_GET "
          "rates (taken "
          "from an earlier run of the 0.5B torch row: a calibration there, a check elsewhere); no PCIe, no link, "
          "no vLLM reload")
    fp32_bytes = 4 * full_param_count(BENCH_RL_SHAPE)
    for n, measured_s in ((1, 0.036), (2, 0.050)):
        predicted = object_store_sync_seconds(fp32_bytes, Layout(rollout_gpus=n, learner_gpus=1), tp=1,
                                              link_bytes_per_s=math.inf, host_copy_bytes_per_s=copy_bw,
                                              node_memory_bytes_per_s=copy_bw, pcie_bytes_per_s=math.inf,
                                              pickled=True)
        print(f"rl_cpu_2026-12-02.txt, bench_rl's tiny Qwen2 (fp32, {fp32_bytes / 2**20:.2f} MB) through vLLM's "
              f"reload, {n} actor(s), k=0: measured sync {measured_s:.3f} s, model {predicted:.3f} s (with "
              f"VLLM_RELOAD_OVERHEAD_S {VLLM_RELOAD_OVERHEAD_S} s, itself a guess from the 1-actor figure)")
    tokens = train_seconds(half, Workload(), 1)
    model_tok_s = Workload().sequences * (Workload().prompt_tokens + Workload().response_tokens) / tokens
    print(f"H100 learner, 0.5B bf16 ZeRO-2, 1 GPU: measured {H100_0P5B_BF16_TOKENS_PER_S} tok/s; model "
          f"{model_tok_s:,.0f} tok/s (a calibration, not a check: the model's MFU under 1B is taken from this figure); "
          f"ZeRO-3 bf16 measured 16336 tok/s (ZeRO-3's gathers on 1 GPU: x{H100_0P5B_BF16_TOKENS_PER_S / 16336:.2f} "
          "slower, which the model does not price)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rollout-gpus", default="4,16,64", help="rollout GPU counts, one table each")
    parser.add_argument("--learner-gpus", type=int, default=4, help="learner GPUs (raised to the ZeRO-3 minimum)")
    parser.add_argument("--lora-rank", type=int, default=16, help="the adapter rank in the step tables")
    parser.add_argument("--ratio-ranks", default="8,16,32,64", help="adapter ranks for the bytes-ratio table")
    parser.add_argument("--prompts", type=int, default=Workload.prompts)
    parser.add_argument("--group-size", type=int, default=Workload.group_size)
    parser.add_argument("--prompt-tokens", type=int, default=Workload.prompt_tokens)
    parser.add_argument("--response-tokens", type=int, default=Workload.response_tokens)
    parser.add_argument("--measure", action="store_true", help="also time the object-store sync here (~1 min)")
    args = parser.parse_args()
    work = Workload(args.prompts, args.group_size, args.prompt_tokens, args.response_tokens)
    print_assumptions()
    print_lora_ratios([int(r) for r in args.ratio_ranks.split(",")])
    for n in (int(g) for g in args.rollout_gpus.split(",")):
        print_step_table(work, n, args.learner_gpus, args.lora_rank)
    print("sync columns (seconds): os = object store over a node link of that many Gb/s with a zero-copy payload "
          "(numpy views), today = the same with today's pickled torch-tensor dict, nccl = NCCL broadcast (400G between "
          "nodes, NVLink within one); % = sync / (generate + train + sync), generation and training not overlapped "
          "(rl.max_staleness 0)")
    if args.measure:
        print_measured(args.lora_rank)


if __name__ == "__main__":
    main()
