"""GPU learner check (prints figures; not a test): the DeepSpeed learner path on CUDA, without Ray.

CI runs everything on CPU; this is the on-demand check that the same learner trains on a GPU. It builds a random
Qwen2 of the Qwen2.5-0.5B shape (hidden 896, 24 layers, 14/2 heads, intermediate 4864, tied embeddings, vocab
151936; the tiny local tokenizer's files ride along, nothing is downloaded), a fixed 8 x 1024-token batch (some
responses shorter, so padding is exercised) and a reference: each row scored alone, unpadded, by a plain
transformers fp32 forward with log-softmax in fp64. Behaviour log-probs = reference + N(0, 0.1). Then, for each
ZeRO stage (2, 3) and precision (fp32, bf16), a world-size-1 DeepSpeedLearner (nccl) and it prints:

1. learner.logprobs at init vs the reference (fp32: ~1e-5 expected), bf16 vs fp32 (vLLM's bf16 differs from fp32 by ~2e-3);
2. the loss over 10 canonical-SFT steps on the fixed batch (first, last: it must fall);
3. a PEAR-SFT step per level (none/sequence/token/block, rotating order, one warm-up step each): median ms/step
   (cuda-synchronised), tokens/s (all batch tokens), peak GPU memory, the ratio to level none (the CPU target is
   <= 1.05), loss and grad norm finite, weight diagnostics (they drift to the ceiling as the model fits the batch);
4. one GRPO step (2 minibatches, TIS against the current log-probs + N(0, 0.05), k3 KL to the reference,
   random advantages): finite stats;
5. for the configs in --ckpt: save -> fresh learner -> load restores parameter_checksum and the next two losses of
   the uninterrupted run; a second load tells kernel nondeterminism (two resumes differ too) from state that was not
   restored (resumes repeat yet differ). --deterministic: deterministic kernels, warnings for ops that have none.

Run on the GPU: python benchmarks/bench_gpu_learner.py; on CPU (logic only): ... --device cpu --small
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import shutil
import socket
import statistics
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import transformers

from pear_ray.data import schema
from pear_ray.data.tensors import to_tensors
from pear_ray.models import TinyModelSpec, build_tiny_model
from pear_ray.objectives import PEAR_LEVELS, Grpo, PearSft

QWEN25_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864, vocab_size=151936)
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
             intermediate_size=128, vocab_size=384)
GIB = 2**30


def build_model(folder: Path, shape: dict, max_len: int, device: str) -> tuple[Path, int]:
    """A seeded Qwen2 of the given shape in a Hugging Face folder with the tiny tokenizer's files; (folder, params)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from pear_ray.engines.weights import TOKENIZER_PATTERNS

    tok_dir = build_tiny_model(TinyModelSpec(), folder / "tokenizer")
    config = Qwen2Config(**shape, max_position_embeddings=max(max_len, 512), tie_word_embeddings=True,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)  # <|endoftext|> is id 0
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU is seconds, not a minute
        model = Qwen2ForCausalLM(config).float()
    model_dir = folder / "model"
    model.save_pretrained(model_dir)
    for pattern in TOKENIZER_PATTERNS:
        for source in tok_dir.glob(pattern):
            shutil.copy2(source, model_dir / source.name)
    return model_dir, sum(p.numel() for p in model.parameters())


def make_batch(rows: int, length: int, prompt_len: int, vocab: int, seed: int = 0) -> pa.Table:
    """Random ids; row 0 is full length, the others lose up to 1/8 of their response (right padding)."""
    rng = np.random.default_rng(seed)
    full = length - prompt_len
    cut = np.concatenate([[0], rng.integers(0, full // 8 + 1, rows - 1)])
    return schema.conform(pa.table({
        schema.PROMPT_IDS: rng.integers(3, vocab, (rows, prompt_len)).tolist(),
        schema.RESPONSE_IDS: [rng.integers(3, vocab, full - c).tolist() for c in cut],
    }))


@torch.no_grad()
def reference_logprobs(model_dir: Path, table: pa.Table, device: str) -> list[np.ndarray]:
    """Plain transformers fp32 forward, one row at a time without padding, log-softmax in float64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    out = []
    for i in range(table.num_rows):
        row = to_tensors(table.slice(i, 1), pad_id=0)
        ids = row["input_ids"].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].double()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
        out.append(logp[row["response_mask"][0, 1:].to(device)].cpu().numpy())
    del model
    return out


def with_columns(table: pa.Table, **columns) -> pa.Table:
    """The table with schema columns added, each typed as the schema says."""
    for name, values in columns.items():
        table = schema.append_column(table, name, [np.asarray(v).tolist() for v in values])
    return table


def diff(a, b) -> str:
    """max and mean |a - b| over the response tokens (Arrow list arrays or lists of numpy arrays)."""
    a, b = (np.concatenate(x) if isinstance(x, list) else pc.list_flatten(x).to_numpy(zero_copy_only=False)
            for x in (a, b))
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return f"max {d.max():.2e}  mean {d.mean():.2e}"


def drop(learner) -> None:
    """Shut a learner down; the caller then deletes its name and calls free_memory(). DeepSpeed's destroy() removes
    ZeRO-3's hooks, but two module-level objects of ZeRO-3 keep the whole engine alive: the model on FWD_MODULE_STACK
    and the coordinator in the class-level lru_cache of PartitionedParameterCoordinator.__params_to_release."""
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    learner.engine.destroy()
    parameter_offload.FWD_MODULE_STACK.clear()
    cached = PartitionedParameterCoordinator._PartitionedParameterCoordinator__params_to_release  # NVTX-wrapped
    for cell in cached.__closure__ or ():
        if hasattr(cell.cell_contents, "cache_clear"):
            cell.cell_contents.cache_clear()


def free_memory() -> None:
    gc.collect()  # the engine is full of reference cycles
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def timed(fn, cuda: bool):
    """(fn's result, seconds, peak GiB allocated during fn; nan on CPU)."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return out, seconds, (torch.cuda.max_memory_allocated() / GIB if cuda else math.nan)


class Runner:
    def __init__(self, args, model_dir: Path, table: pa.Table, reference: list[np.ndarray]):
        self.args, self.model_dir, self.table, self.reference = args, model_dir, table, reference
        self.cuda, self.rng = args.device == "cuda", np.random.default_rng(1)
        self.fp32_logprobs: dict[int, pa.Array] = {}
        with socket.socket() as sock:  # a free rendezvous port
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]

    def learner(self, stage: int, bf16: bool):
        from pear_ray.engines.deepspeed_learner import DeepSpeedLearner

        return DeepSpeedLearner(self.model_dir, zero_stage=stage, bf16=bf16, lr=self.args.lr, master_port=self.port)

    def steps(self, learner, n: int, level: str = "token") -> list[float]:
        return [learner.step(self.table, PearSft(level=level))["loss"] for _ in range(n)]

    def run(self, stage: int, bf16: bool) -> None:
        table, precision = self.table, "bf16" if bf16 else "fp32"
        learner, init_s, _ = timed(lambda: self.learner(stage, bf16), self.cuda)
        held = torch.cuda.memory_allocated() / GIB if self.cuda else math.nan
        dtype = next(learner.engine.module.parameters()).dtype
        print(f"\n== ZeRO-{stage} {precision}: on {learner.device}, module {dtype}, init {init_s:.1f} s, "
              f"{held:.2f} GiB allocated")
        logp = learner.logprobs(table)
        print(f"logprobs vs plain transformers fp32 (per row, unpadded): {diff(logp, self.reference)}")
        for other, values in self.fp32_logprobs.items():
            if bf16 == (other == stage):  # bf16 vs fp32 at the same stage; fp32 vs fp32 at the other stages
                print(f"logprobs vs ZeRO-{other} fp32 learner (same weights):   {diff(logp, values)}")
        if not bf16:
            self.fp32_logprobs[stage] = logp

        curve = self.steps(learner, self.args.curve_steps, level="none")
        falls = all(map(math.isfinite, curve)) and curve[-1] < curve[0]
        print(f"loss over {len(curve)} canonical steps: first {curve[0]:.4f} last {curve[-1]:.4f} "
              f"({'falls' if falls else 'DOES NOT FALL'}); all: {' '.join(f'{x:.4f}' for x in curve)}")
        self.time_levels(learner)

        rollout = [np.minimum(x + self.rng.normal(0, 0.05, len(x)), 0.0) for x in learner.logprobs(table).to_pylist()]
        rl_table = with_columns(table, **{schema.ROLLOUT_LOGPROBS: rollout, schema.REF_LOGPROBS: self.reference,
                                          schema.ADVANTAGE: self.rng.normal(0, 1, table.num_rows)})
        rl, rl_s, rl_gib = timed(lambda: learner.step(rl_table, Grpo(kl_coef=0.01, minibatches=2)), self.cuda)
        ok = all(math.isfinite(float(v)) for v in rl.values())
        print(f"GRPO step ({rl_s:.2f} s, peak {rl_gib:.2f} GiB, {'finite' if ok else 'NOT FINITE'}): "
              + " ".join(f"{k}={v:.4g}" for k, v in rl.items()))

        if f"{stage}:{precision}" not in self.args.ckpt.split(","):
            drop(learner)
            del learner
            free_memory()
        else:  # save, go on 2 steps, drop; then a fresh learner loads and takes the same 2 steps, twice
            ckpt = Path(self.args.workdir) / f"ckpt_{stage}_{precision}"
            (tag, save_s, _), saved = timed(lambda: learner.save_checkpoint(ckpt), self.cuda), learner.parameter_checksum()
            step, uninterrupted = learner.optimizer_steps, self.steps(learner, 2)
            drop(learner)
            del learner
            free_memory()
            learner = self.learner(stage, bf16)
            _, load_s, _ = timed(lambda: learner.load_checkpoint(ckpt), self.cuda)
            loaded, loaded_step, resumed = learner.parameter_checksum(), learner.optimizer_steps, self.steps(learner, 2)
            learner.load_checkpoint(ckpt)
            again = self.steps(learner, 2)
            drop(learner)
            del learner
            free_memory()
            size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / GIB
            shutil.rmtree(ckpt)
            verdict = ("IDENTICAL" if resumed == uninterrupted else "DIFFERENT, as are two resumes: kernel "
                       "nondeterminism" if again != resumed else "DIFFERENT though resumes repeat: state NOT restored")
            print(f"checkpoint {tag} ({size:.2f} GiB, save {save_s:.1f} s, load {load_s:.1f} s): checksum saved "
                  f"{saved!r} loaded {loaded!r} ({'equal' if saved == loaded else 'DIFFER'}), step {step} -> "
                  f"{loaded_step}; next 2 losses: uninterrupted {uninterrupted}, resumed {resumed}, resumed again "
                  f"{again} -> {verdict} (max diff {max(abs(a - b) for a, b in zip(uninterrupted, resumed)):.2e})")
        left = torch.cuda.memory_allocated() / GIB if self.cuda else math.nan
        print(f"{left:.2f} GiB still allocated after release")

    def time_levels(self, learner) -> None:
        levels, table, rounds = list(PEAR_LEVELS), self.table, self.args.rounds
        seconds = {level: [] for level in levels}
        peak = dict.fromkeys(levels, 0.0 if self.cuda else math.nan)
        last, finite = {}, dict.fromkeys(levels, True)
        for level in levels:  # warm-up
            learner.step(table, PearSft(level=level))
        for r in range(rounds):
            for level in levels[r % len(levels):] + levels[:r % len(levels)]:
                stats, dt, gib = timed(lambda level=level: learner.step(table, PearSft(level=level)), self.cuda)
                seconds[level].append(dt)
                peak[level], last[level] = max(peak[level], gib), stats
                finite[level] &= math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"])
        tokens = sum(pc.sum(pc.list_value_length(table.column(c))).as_py()
                     for c in (schema.PROMPT_IDS, schema.RESPONSE_IDS))
        print(f"{'level':<9} {'ms/step':>8} {'p25-p75':>13} {'tok/s':>8} {'peak GiB':>8} {'vs none':>7} {'finite':>6} "
              f"{'mean_w':>7} {'ess_frac':>8} {'floor':>6} {'ceil':>6}   ({rounds} rounds)")
        for level in levels:
            p25, p75 = np.percentile(seconds[level], [25, 75])
            ratio = statistics.median(a / b for a, b in zip(seconds[level], seconds["none"]))
            s, median = last[level], statistics.median(seconds[level])
            print(f"{level:<9} {1e3 * median:8.1f} {f'{1e3 * p25:.1f}-{1e3 * p75:.1f}':>13} {tokens / median:8.0f} "
                  f"{peak[level]:8.2f} {ratio:7.3f} {'yes' if finite[level] else 'NO':>6} {s['mean_weight']:7.3f} "
                  f"{s['ess_fraction']:8.3f} {s['frac_at_floor']:6.3f} {s['frac_at_ceiling']:6.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny model and batch (always on CPU: checks the logic)")
    parser.add_argument("--rows", type=int, help="default 8 (--small: 4)")
    parser.add_argument("--length", type=int, help="tokens per row, prompt + response; default 1024 (--small: 128)")
    parser.add_argument("--vocab", type=int, help="the model's vocabulary size (default 151936, --small: 384)")
    parser.add_argument("--stages", default="2,3")
    parser.add_argument("--precisions", help="comma list of fp32,bf16 (default: both on cuda, fp32 on cpu)")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per PEAR level")
    parser.add_argument("--curve-steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--ckpt", default="2:bf16,3:bf16,2:fp32",
                        help="stage:precision configs that get the checkpoint round trip")
    parser.add_argument("--deterministic", action="store_true",
                        help="torch.use_deterministic_algorithms(True, warn_only=True): ops without a deterministic "
                             "CUDA kernel then warn, once each")
    parser.add_argument("--workdir", help="where model and checkpoints go (default: a temporary folder)")
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"  # the learner then stays on CPU (gloo) even where a GPU exists
    if args.deterministic:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # cuBLAS's condition for deterministic results
        torch.use_deterministic_algorithms(True, warn_only=True)
    args.small = args.small or args.device == "cpu"  # a 0.5B model on CPU would take hours under `make bench`
    shape = dict(SMALL if args.small else QWEN25_05B)
    shape["vocab_size"] = args.vocab or shape["vocab_size"]
    rows = args.rows or (4 if args.small else 8)
    length = args.length or (128 if args.small else 1024)
    prompt_len = length // 4
    precisions = (args.precisions or ("fp32,bf16" if args.device == "cuda" else "fp32")).split(",")

    cuda = args.device == "cuda"
    transformers.utils.logging.disable_progress_bar()
    print(f"device {torch.cuda.get_device_name() if cuda else 'CPU'}; torch {torch.__version__}, deepspeed "
          f"{version('deepspeed')}, transformers {version('transformers')}")
    with tempfile.TemporaryDirectory() as tmp:
        args.workdir = args.workdir or tmp
        (model_dir, params), build_s, _ = timed(lambda: build_model(Path(args.workdir), shape, length, args.device),
                                                cuda)
        table = make_batch(rows, length, prompt_len, shape["vocab_size"])
        print(f"model: Qwen2 {shape}, tied embeddings, {params / 1e6:.1f}M params (built in {build_s:.1f} s); batch "
              f"{rows} x {length} ({prompt_len} prompt, {schema.response_token_count(table)} response tokens); "
              f"lr {args.lr}")
        reference, ref_s, ref_gib = timed(lambda: reference_logprobs(model_dir, table, args.device), cuda)
        print(f"reference forward (plain transformers, fp32, row by row): {ref_s:.1f} s, peak {ref_gib:.2f} GiB")
        rng = np.random.default_rng(0)
        noisy = [np.minimum(r + rng.normal(0, 0.1, r.shape), 0.0) for r in reference]
        runner = Runner(args, model_dir, with_columns(table, **{schema.BEHAVIOR_LOGPROBS: noisy}), reference)
        for stage in (int(s) for s in args.stages.split(",")):
            for precision in precisions:
                runner.run(stage, precision == "bf16")


if __name__ == "__main__":
    main()
