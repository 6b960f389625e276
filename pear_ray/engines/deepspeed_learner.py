"""One DeepSpeed learner rank: PEAR-SFT and GRPO steps, checkpoints, Hugging Face export, weights for rollout.

No Ray here: `pear_ray.actors.learner` runs one of these per Ray actor and feeds each its shard of a batch. A rank
sets its own rendezvous variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and joins the process
group (gloo on CPU, nccl on GPU), so no launcher is involved (PLATFORM.md, "DeepSpeed on CPU").

Loss normalisation under data parallelism. DeepSpeed averages gradients over the ranks, so a rank whose loss is
`sum_local / (N_global / world_size)` contributes exactly its share of the global-batch loss `sum_global / N_global`:
the averaged gradient is the gradient of the global loss, whatever the split of rows or tokens over the ranks.
N_global is a token count (known from the batch every rank holds) or, for PEAR's `normalize: weights`, the sum of
the weights over the global batch's response tokens (depends on the model: all-reduced inside the step).
DeepSpeed's own batch bookkeeping (train_batch_size, micro batch, gradient accumulation) is therefore set to
1 row x 1 accumulation step x world size and never consulted: every `engine.step()` is one optimizer update on
whatever rows the rank was given.

Every public method is collective: all ranks of a group must call it, in the same order (ZeRO-3 gathers
parameters inside forward, and every step all-reduces).
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pear_ray.data import schema
from pear_ray.data.tensors import from_tensor, to_tensors
from pear_ray.engines.hf_scorer import forward_token_logprobs
from pear_ray.objectives import aggregate, k3_kl, masked_mean, pear_loss, pear_weights, policy_loss

log = logging.getLogger(__name__)

LR_SCHEDULES = ("constant", "cosine", "linear")
# Our names (config.py) -> transformers.get_scheduler names; all three warm up linearly over warmup_steps.
_HF_SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}
# Files of a model folder that make up its tokenizer; export_hf copies them next to the weights.
TOKENIZER_PATTERNS = ("tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                      "chat_template*", "spiece.model")
PEAR_FIELDS = ("level", "gamma", "block_size", "delta_clip", "log_weight_clip", "target_mode",  # PearConfig's
               "normalize")
_STATE_KEY = "pear_ray"  # our entry in DeepSpeed's client_state


def _prepare_deepspeed(use_gpu: bool):
    """Import DeepSpeed for this process: CPU accelerator unless a GPU is used, no shm comm-op JIT build."""
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read once, when DeepSpeed first picks its accelerator
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    # The shm op is only a faster intra-node allreduce for CPU; building it costs ~25 s of g++ (PLATFORM.md).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if ds_logger.level < logging.WARNING:
        ds_logger.setLevel(logging.WARNING)
    # DeepSpeed 0.19.8's ZeRO calls torch.distributed.all_gather_into_tensor / reduce_scatter_tensor, which torch
    # 2.13 deprecates with a FutureWarning on every step.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    return deepspeed


class DeepSpeedLearner:
    """One data-parallel rank of the learner.

    model_dir: a Hugging Face causal-LM folder (weights, config, tokenizer). The model is loaded in fp32; with
    `bf16=True` (GPU) DeepSpeed trains in bf16 with fp32 master weights. zero_stage 0-3. The optimizer is torch's
    AdamW (DeepSpeed's fused/CPU Adam would JIT-compile for ~40 s on CPU); gradient clipping is DeepSpeed's
    (`gradient_clipping`); the LR schedule warms up linearly over `warmup_steps`, then stays constant or decays
    (cosine, linear) to 0 at `total_steps`. `temperature` is the rollouts' sampling temperature: RL's log-probs
    (logp_old, the policy in the surrogate, `logprobs`) are of logits / temperature, the distribution the rollout
    sampled from, so the importance ratios compare like with like; SFT trains the model's own distribution.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        rank: int = 0,
        world_size: int = 1,
        master_addr: str = "127.0.0.1",
        master_port: int = 29500,
        zero_stage: int = 2,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        grad_clip: float = 1.0,
        warmup_steps: int = 0,
        total_steps: int | None = None,
        lr_schedule: str = "constant",
        seed: int = 0,
        bf16: bool = False,
        local_rank: int = 0,
        num_threads: int | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        temperature: float = 1.0,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        if lr_schedule != "constant" and not total_steps:
            raise ValueError(f"lr_schedule {lr_schedule!r} decays to 0 at total_steps: give total_steps > 0")
        self.model_dir = Path(model_dir)
        self.rank, self.world_size, self.zero_stage = rank, world_size, zero_stage
        self.temperature = temperature
        self.step = 0  # optimizer updates applied (SFT steps and RL updates alike)
        if num_threads:
            torch.set_num_threads(int(num_threads))
        use_gpu = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
        if bf16 and not use_gpu:
            raise ValueError("bf16=True needs a GPU; the CPU learner trains in fp32")
        if not use_gpu:
            # PEAR weights at the floor (e^-10) make denormal gradients and Adam moments, which are very slow on
            # CPU; flushing them to zero changes nothing measurable and keeps the step time flat.
            torch.set_flush_denormal(True)

        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank),
                          MASTER_ADDR=str(master_addr), MASTER_PORT=str(master_port))
        deepspeed = self._deepspeed = _prepare_deepspeed(use_gpu)
        deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo", auto_mpi_discovery=False,
                                   verbose=False)
        self._seed_everything(seed)

        from transformers import AutoModelForCausalLM, get_scheduler

        model = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=torch.float32)
        self.pad_id = int(model.config.pad_token_id if model.config.pad_token_id is not None else 0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

        def make_scheduler(opt):
            return get_scheduler(_HF_SCHEDULES[lr_schedule], opt, num_warmup_steps=warmup_steps,
                                 num_training_steps=total_steps)

        config = {
            "train_batch_size": world_size,  # bookkeeping only, see the module docstring
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": float(grad_clip),
            "zero_optimization": {"stage": zero_stage},
            "zero_allow_untested_optimizer": True,  # torch AdamW under ZeRO
            "bf16": {"enabled": bool(bf16)},
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        # The scheduler is built by DeepSpeed from the optimizer it wraps, so engine.step() advances it and
        # save/load_checkpoint include it.
        self.engine, _, _, self.lr_scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=make_scheduler, config=config)
        # No dropout, ever: the training forward, logp_old and logprobs() must all be the same distribution (and
        # from_pretrained already returns the model in eval mode). Dropout-free RL is the usual choice for LLMs.
        self.engine.module.eval()
        self.device = self.engine.device

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _tensors(self, table: pa.Table, columns: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        missing = [name for name in columns if name not in table.column_names]
        if missing:
            raise ValueError(f"the batch lacks column(s) {missing}; it has {table.column_names}")
        return {key: value.to(self.device) for key, value in to_tensors(table, self.pad_id, columns).items()}

    def _all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a few floats over the ranks (float64)."""
        if self.world_size == 1:
            return [float(v) for v in values]
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        self._deepspeed.comm.all_reduce(tensor)
        return tensor.tolist()

    def _grad_norm_stage0(self) -> float | None:
        """Stage 0 in fp32 clips without reporting the norm; the gradients are already averaged here."""
        if self.zero_stage != 0 or self.engine.bfloat16_enabled():
            return None
        grads = [p.grad.detach().double() for p in self.engine.module.parameters() if p.grad is not None]
        return math.sqrt(sum(float(g.square().sum()) for g in grads)) if grads else 0.0

    def _update(self, loss: torch.Tensor) -> tuple[float, float]:
        """Backward and one optimizer step; returns (pre-clip global grad norm, lr used by this update)."""
        lr = float(self.engine.get_lr()[0])
        self.engine.backward(loss)
        own_norm = self._grad_norm_stage0()
        self.engine.step()
        self.step += 1
        norm = self.engine.get_global_grad_norm()
        norm = own_norm if norm is None else float(norm)
        return (float("nan") if norm is None else norm), lr

    def _require_rows(self, table: pa.Table, what: str, per_rank: int = 1) -> None:
        if table.num_rows < per_rank:
            raise ValueError(f"{what}: rank {self.rank} got {table.num_rows} rows but needs at least {per_rank}; "
                             "every rank must train on at least one row per update")

    # ------------------------------------------------------------------ training

    def sft_step(self, table: pa.Table, global_num_tokens: int | None = None, **pear: Any) -> dict[str, float]:
        """One PEAR-weighted SFT update on this rank's rows; returns global-batch figures (same on every rank).

        global_num_tokens: response tokens in the whole global batch (all ranks); defaults to this shard's count,
        which is right only at world size 1. pear: PearConfig fields (level, gamma, block_size, delta_clip,
        log_weight_clip, target_mode, normalize). Reads behavior_logprobs (not needed at level none) and, for
        target_mode frozen, ref_logprobs (not needed at level none either: no target is read).
        """
        unknown = set(pear) - set(PEAR_FIELDS)
        if unknown:
            raise ValueError(f"unknown PEAR setting(s) {sorted(unknown)}; expected some of {PEAR_FIELDS}")
        self._require_rows(table, "sft_step")
        if global_num_tokens is None:
            if self.world_size > 1:
                raise ValueError("sft_step needs global_num_tokens (the whole batch's response tokens) when "
                                 "world_size > 1")
            global_num_tokens = schema.response_token_count(table)
        level = pear.get("level", "token")
        frozen = pear.get("target_mode", "online") == "frozen" and level != "none"
        has_behavior = schema.BEHAVIOR_LOGPROBS in table.column_names
        columns = (schema.BEHAVIOR_LOGPROBS,) if (level != "none" or has_behavior) else ()
        columns += (schema.REF_LOGPROBS,) if frozen else ()
        batch = self._tensors(table, columns)
        mask = batch["response_mask"]
        logp = forward_token_logprobs(self.engine, batch)
        behavior = batch.get(schema.BEHAVIOR_LOGPROBS, torch.zeros_like(logp))
        weighting = dict(
            level=level,
            gamma=pear.get("gamma", 0.999),
            block_size=pear.get("block_size", 4),
            delta_clip=tuple(pear.get("delta_clip", (-0.08, 0.3))),
            log_weight_clip=tuple(pear.get("log_weight_clip", (-10.0, 5.0))),
        )
        target = batch[schema.REF_LOGPROBS] if frozen else None
        if pear.get("normalize", "tokens") == "weights":  # every rank needs the global weight sum before its loss
            local_sum = float(pear_weights(logp.detach() if target is None else target, behavior, mask,
                                           **weighting).sum())
            divisor = {"normalize": "weights", "weight_sum": self._all_reduce_sum([local_sum])[0] / self.world_size}
        else:
            divisor = {"num_tokens": global_num_tokens / self.world_size}
        loss, diag = pear_loss(logp, behavior, mask, **weighting, target_mode="frozen" if frozen else "online",
                               logp_target_frozen=target, **divisor)
        grad_norm, lr = self._update(loss)

        # Global figures from per-rank sums: loss_r = sum_r / (N / W), so the global loss is sum_r(loss_r) / W.
        n = diag.num_tokens
        weight_sum = diag.mean_weight * n
        weight_sq_sum = weight_sum**2 / diag.ess if diag.ess > 0 else 0.0
        (loss_sum, n, weight_sum, weight_sq_sum, floor, ceiling, log_ratio) = self._all_reduce_sum([
            float(loss.detach()), n, weight_sum, weight_sq_sum,
            diag.frac_at_floor * n, diag.frac_at_ceiling * n, diag.mean_log_ratio * n])
        ess = weight_sum**2 / weight_sq_sum if weight_sq_sum > 0 else 0.0
        return {
            "loss": loss_sum / self.world_size,
            "grad_norm": grad_norm,
            "lr": lr,
            "step": self.step,
            "num_tokens": int(round(n)),
            "mean_weight": weight_sum / max(n, 1),
            "ess": ess,
            "ess_fraction": ess / max(n, 1),
            "frac_at_floor": floor / max(n, 1),
            "frac_at_ceiling": ceiling / max(n, 1),
            "mean_log_ratio": log_ratio / max(n, 1),
        }

    def rl_step(
        self,
        table: pa.Table,
        *,
        clip_low: float = 0.2,
        clip_high: float = 0.28,
        kl_coef: float = 0.0,
        loss_aggregation: str = "token-mean",
        tis_cap: float | None = 2.0,
        minibatches: int = 1,
        epochs_per_batch: int = 1,
    ) -> dict[str, float]:
        """GRPO on this rank's rows: `epochs_per_batch` passes over `minibatches` contiguous minibatches, one
        optimizer update each, against logp_old computed once under the weights before the first update.

        Reads advantage (one per row), rollout_logprobs when tis_cap is set (truncated importance sampling),
        ref_logprobs when kl_coef > 0 (k3 KL penalty). Each update is normalised over the global minibatch (the
        m-th minibatch of every rank): token-mean divides by its response tokens, sequence-mean by its rows
        with a response. Returns the averages over the updates of global-minibatch figures.
        """
        aggregation = loss_aggregation.replace("_", "-")  # token_mean is accepted too
        if aggregation not in ("token-mean", "sequence-mean"):
            raise ValueError(f"loss_aggregation must be token-mean or sequence-mean, got {loss_aggregation!r}")
        if minibatches < 1 or epochs_per_batch < 1:
            raise ValueError("minibatches and epochs_per_batch must be >= 1")
        self._require_rows(table, f"rl_step with {minibatches} minibatch(es)", minibatches)
        if schema.ADVANTAGE not in table.column_names:
            raise ValueError(f"rl_step needs the {schema.ADVANTAGE!r} column; the batch has {table.column_names}")
        columns = ((schema.ROLLOUT_LOGPROBS,) if tis_cap is not None else ()) + \
                  ((schema.REF_LOGPROBS,) if kl_coef > 0 else ())

        bounds = np.linspace(0, table.num_rows, minibatches + 1).round().astype(int)  # array_split's cut points
        parts = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            part = table.slice(int(start), int(end - start))
            batch = self._tensors(part, columns)
            advantage = np.asarray(part.column(schema.ADVANTAGE).to_numpy(zero_copy_only=False), dtype=np.float32)
            batch["advantage"] = torch.tensor(advantage, device=self.device)
            parts.append(batch)
        with torch.no_grad():
            for batch in parts:
                batch["logp_old"] = forward_token_logprobs(self.engine, batch, self.temperature)

        # Global size of each minibatch (tokens for token-mean, rows with a response for sequence-mean).
        local_sizes = [float(b["response_mask"].sum()) if aggregation == "token-mean"
                       else float(b["response_mask"].any(1).sum()) for b in parts]
        global_sizes = self._all_reduce_sum(local_sizes)

        totals = np.zeros(7)  # loss, clip_fraction*n, approx_kl*n, mean_ratio*n, tis_capped*n, kl_ref*n, n
        grad_norms, lr = [], 0.0
        for _ in range(epochs_per_batch):
            for batch, local_size, global_size in zip(parts, local_sizes, global_sizes):
                mask = batch["response_mask"]
                logp = forward_token_logprobs(self.engine, batch, self.temperature)
                loss, stats = policy_loss(
                    logp, batch["logp_old"], batch["advantage"], mask, eps_low=clip_low, eps_high=clip_high,
                    logp_rollout=batch.get(schema.ROLLOUT_LOGPROBS), tis_cap=tis_cap or 0.0,
                    aggregation=aggregation)
                kl_token_mean = 0.0  # reported per token whatever the aggregation, so it sums over ranks
                if kl_coef > 0:
                    kl = k3_kl(logp, batch[schema.REF_LOGPROBS])
                    loss = loss + kl_coef * aggregate(kl, mask, aggregation)
                    kl_token_mean = float(masked_mean(kl.detach(), mask))
                # local mean -> this rank's share of the global-minibatch mean (DeepSpeed averages over ranks)
                share = local_size * self.world_size / max(global_size, 1.0)
                loss = loss * share
                norm, lr = self._update(loss)
                grad_norms.append(norm)
                n = float(mask.sum())
                totals += [float(loss.detach()), stats.clip_fraction * n, stats.approx_kl * n,
                           stats.mean_ratio * n, stats.tis_capped_fraction * n, kl_token_mean * n, n]
        totals = self._all_reduce_sum(totals.tolist())
        updates, n = len(grad_norms), max(totals[6], 1.0)
        return {
            "loss": totals[0] / self.world_size / updates,
            "clip_fraction": totals[1] / n,
            "approx_kl": totals[2] / n,
            "mean_ratio": totals[3] / n,
            "tis_capped_fraction": totals[4] / n,
            "kl_ref": totals[5] / n,
            "grad_norm": float(np.mean(grad_norms)),
            "lr": lr,
            "updates": updates,
            "step": self.step,
        }

    @torch.no_grad()
    def logprobs(self, table: pa.Table) -> pa.ListArray:
        """log pi(response token | prefix) under the current weights and `temperature`, one list<float32> per row.

        A rank may get no rows (a batch smaller than the group): under ZeRO-3 it still runs a one-token forward,
        because every rank must take part in the parameter all-gathers.
        """
        if table.num_rows == 0:
            if self.zero_stage == 3:
                dummy = torch.full((1, 1), self.pad_id, dtype=torch.long, device=self.device)
                self.engine(input_ids=dummy, attention_mask=torch.ones_like(dummy))
            return pa.array([], type=pa.list_(pa.float32()))
        batch = self._tensors(table)
        return from_tensor(forward_token_logprobs(self.engine, batch, self.temperature), batch["response_mask"])

    # ------------------------------------------------------------------ weights out

    def _gathered_params(self, to_all: bool = False):
        """Yield (HF name, full tensor) per parameter, then persistent buffers; under ZeRO-3 one gather each.

        Yields on rank 0 only unless to_all; every rank must iterate to the end (the gathers are collective).
        """
        module = self.engine.module
        emit = to_all or self.rank == 0
        for name, param in module.named_parameters():
            gather = (self._deepspeed.zero.GatheredParameters([param], modifier_rank=None)
                      if self.zero_stage == 3 else nullcontext())
            with gather:
                if emit:
                    yield name, param.detach()
        if emit:  # buffers are never partitioned; only persistent ones belong in a state dict
            for name, buffer in module.named_buffers():
                owner, _, leaf = name.rpartition(".")
                if leaf not in module.get_submodule(owner)._non_persistent_buffers_set:
                    yield name, buffer.detach()

    def state_dict_for_rollout(self) -> dict[str, torch.Tensor] | None:
        """Full weights on rank 0 as {HF name: CPU contiguous tensor} (copies, not views of the live
        parameters), in the training dtype; None on other ranks. Collective under ZeRO-3."""
        out = {}
        for name, tensor in self._gathered_params():
            out[name] = tensor.to("cpu", copy=True).contiguous()
        return out if self.rank == 0 else None

    @torch.no_grad()
    def parameter_checksum(self) -> float:
        """A position-sensitive float64 fingerprint of the full parameters: sum_i p_i cos(i) per tensor, summed.
        Every rank returns it (collective under ZeRO-3); for tests comparing ranks and runs."""
        total = 0.0
        for _, tensor in self._gathered_params(to_all=True):
            flat = tensor.reshape(-1).double()
            total += float(flat @ torch.cos(torch.arange(flat.numel(), dtype=torch.float64, device=flat.device)))
        return total

    def export_hf(self, out_dir: str | Path) -> str | None:
        """Write a Hugging Face model folder (safetensors, config, generation config, the tokenizer files of
        model_dir) from rank 0. Collective under ZeRO-3. Returns the folder on rank 0, None elsewhere."""
        state = self.state_dict_for_rollout()
        if self.rank != 0:
            return None
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.engine.module.save_pretrained(str(out), state_dict=state)
        for pattern in TOKENIZER_PATTERNS:
            for source in self.model_dir.glob(pattern):
                if source.is_file():
                    shutil.copy2(source, out / source.name)
        return str(out)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, ckpt_dir: str | Path, client_state: dict | None = None, tag: str | None = None) -> str:
        """DeepSpeed checkpoint (module, optimizer, LR scheduler) under ckpt_dir/tag (default `step<N>`), plus
        our step counter and the caller's client_state, plus this rank's RNG states (python, numpy, torch) in
        rng_rank<r>.pt. ckpt_dir must be one folder every rank can write (a shared filesystem on a cluster).
        Returns the tag."""
        tag = tag or f"step{self.step}"
        state = {_STATE_KEY: {"step": self.step, "client_state": dict(client_state or {})}}
        self.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=state)
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        rng_dir = Path(ckpt_dir) / tag  # DeepSpeed creates it only on the ranks that write model/optimizer files
        rng_dir.mkdir(parents=True, exist_ok=True)
        torch.save(rng, rng_dir / f"rng_rank{self.rank}.pt")
        return tag

    def load_checkpoint(self, ckpt_dir: str | Path, tag: str | None = None) -> dict:
        """Restore module, optimizer, scheduler, step counter and RNG states from save_checkpoint's folder
        (tag defaults to the latest); returns the caller's client_state."""
        ckpt_dir = Path(ckpt_dir)
        if tag is None:
            latest = ckpt_dir / "latest"
            if not latest.is_file():
                raise FileNotFoundError(f"no checkpoint in {ckpt_dir} (no 'latest' file)")
            tag = latest.read_text().strip()
        path, state = self.engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint {tag!r} in {ckpt_dir}")
        ours = (state or {}).get(_STATE_KEY)
        if ours is None:
            raise ValueError(f"{ckpt_dir}/{tag} was not written by DeepSpeedLearner.save_checkpoint")
        self.step = int(ours["step"])
        rng_file = ckpt_dir / tag / f"rng_rank{self.rank}.pt"
        if rng_file.is_file():
            rng = torch.load(rng_file, weights_only=False)
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        else:
            log.warning("no RNG state for rank %d in %s (saved with fewer ranks?); RNG not restored",
                        self.rank, ckpt_dir / tag)
        return dict(ours["client_state"])

    def get_step(self) -> int:
        return self.step

    def current_lr(self) -> float:
        return float(self.engine.get_lr()[0])
