"""One DeepSpeed learner rank, blind to the algorithm: `step(batch, objective)`, log-probs, weights, checkpoints.

No Ray here: `pear_ray.actors.learner` runs one of these per Ray actor and feeds each its shard of a batch.

A step. The objective (a typed config from pear_ray.objectives) names the columns it reads, how many minibatches
and epochs a step makes, and whether it is on-policy (scored at the sampling temperature, with `logp_old` taken
before the first update). Per update the learner runs the forward pass, the objective returns its loss as a sum
and a size (objectives/base.py), and the learner divides by the global size: DeepSpeed averages gradients over the
ranks, so a rank whose loss is `sum_local / (size_global / world_size)` contributes exactly its share of the global
loss `sum_global / size_global`, whatever the split of rows or tokens. The size is summed over the ranks inside
the update (one small all-reduce), which is what lets it depend on the model (PEAR's `normalize: weights`).
Statistics are summed over ranks and updates and handed back to the objective to report.

Every public method is collective: all ranks of a group must call it, in the same order (ZeRO-3 gathers
parameters inside forward, and every update all-reduces).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pear_ray.data.tensors import from_tensor, to_tensors
from pear_ray.engines import checkpoints, weights
from pear_ray.engines.deepspeed_setup import build_engine, join_process_group, prepare_deepspeed, seed_everything
from pear_ray.engines.hf_scorer import forward, logprobs_at
from pear_ray.objectives import ObjectiveConfig, ObjectiveInputs
from pear_ray.objectives.pear import divide


class DeepSpeedLearner:
    """One data-parallel rank of the learner.

    model_dir: a Hugging Face causal-LM folder (weights, config, tokenizer), trained in fp32, or with `bf16=True`
    (GPU) in bf16 with fp32 master weights; zero_stage 0-3. Gradient clipping is DeepSpeed's (`grad_clip`); the
    LR schedule warms up linearly over `warmup_steps`, then stays constant or decays (cosine, linear) to 0 at
    `total_steps`. `temperature` is the rollouts' sampling temperature: on-policy objectives and `logprobs` see
    logits / temperature, the distribution the rollout sampled from, so importance ratios compare like with like;
    other objectives train the model's own distribution.
    """

    def __init__(self, model_dir: str | Path, *, rank: int = 0, world_size: int = 1, master_addr: str = "127.0.0.1",
                 master_port: int = 29500, zero_stage: int = 2, lr: float = 1e-5, weight_decay: float = 0.0,
                 grad_clip: float = 1.0, warmup_steps: int = 0, total_steps: int | None = None,
                 lr_schedule: str = "constant", seed: int = 0, bf16: bool = False, local_rank: int = 0,
                 num_threads: int | None = None, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 temperature: float = 1.0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
        self.model_dir = Path(model_dir)
        self.rank, self.world_size, self.zero_stage = rank, world_size, zero_stage
        self.temperature = temperature
        self.optimizer_steps = 0  # updates applied (SFT steps and RL updates alike)
        if num_threads:
            torch.set_num_threads(int(num_threads))
        use_gpu = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
        if bf16 and not use_gpu:
            raise ValueError("bf16=True needs a GPU; the CPU learner trains in fp32")
        if not use_gpu:
            # PEAR weights at the floor (e^-10) make denormal gradients and Adam moments, which are very slow on
            # CPU; flushing them to zero changes nothing measurable and keeps the step time flat.
            torch.set_flush_denormal(True)
        self.deepspeed = prepare_deepspeed(use_gpu)
        join_process_group(self.deepspeed, rank=rank, world_size=world_size, local_rank=local_rank,
                           master_addr=master_addr, master_port=master_port, use_gpu=use_gpu)
        seed_everything(seed)
        self.engine, self.lr_scheduler, self.pad_id = build_engine(
            self.deepspeed, self.model_dir, world_size=world_size, zero_stage=zero_stage, lr=lr,
            weight_decay=weight_decay, grad_clip=grad_clip, warmup_steps=warmup_steps, total_steps=total_steps,
            lr_schedule=lr_schedule, bf16=bf16, betas=betas, eps=eps)
        self.device = self.engine.device

    # ------------------------------------------------------------------ training

    def step(self, table: pa.Table, objective: ObjectiveConfig) -> dict[str, float]:
        """One step of `objective` on this rank's rows: `minibatches` contiguous parts, `epochs` passes, one
        optimizer update per part and pass. Returns global figures (the same on every rank): the loss averaged
        over the updates, grad norm, lr, updates, the optimizer updates so far (`step`), and the objective's
        report."""
        minibatches, epochs = objective.updates()
        if table.num_rows < minibatches:
            raise ValueError(f"{objective.kind}: rank {self.rank} got {table.num_rows} rows for {minibatches} "
                             "minibatch(es); every rank must train on at least one row per update")
        missing = [name for name in objective.columns() if name not in table.column_names]
        if missing:
            raise ValueError(f"objective {objective.kind!r} needs column(s) {missing}, which the batch lacks; it "
                             f"has {table.column_names}")
        columns = (*objective.columns(), *(name for name in objective.optional_columns()
                                           if name in table.column_names and name not in objective.columns()))
        on_policy = objective.on_policy()
        temperature = self.temperature if on_policy else 1.0
        bounds = np.linspace(0, table.num_rows, minibatches + 1).round().astype(int)  # array_split's cut points
        parts = [self._tensors(table.slice(int(a), int(b - a)), columns) for a, b in zip(bounds[:-1], bounds[1:])]
        if on_policy:
            with torch.no_grad():
                for part in parts:
                    part["logp_old"] = forward(self.engine, part, temperature)[0]

        losses, grad_norms, sums, lr = [], [], {}, 0.0
        for _ in range(epochs):
            for part in parts:
                logp, logits = forward(self.engine, part, temperature)
                terms = objective.loss(ObjectiveInputs(
                    logp=logp, mask=part["response_mask"], columns=part, logp_old=part.get("logp_old"),
                    logprobs_at=lambda ids, logits=logits: logprobs_at(logits, ids)))
                [global_size] = self._all_reduce_sum([float(terms.size)])
                loss = divide(terms.total, global_size / self.world_size)
                norm, lr = self._update(loss)
                losses.append(float(loss.detach()))
                grad_norms.append(norm)
                for name, value in terms.stats.items():
                    sums[name] = sums.get(name, 0.0) + float(value)
        names = sorted(sums)
        loss_sum, *totals = self._all_reduce_sum([sum(losses), *(sums[name] for name in names)])
        return {"loss": loss_sum / self.world_size / len(losses), "grad_norm": float(np.mean(grad_norms)),
                "lr": lr, "updates": len(losses), "step": self.optimizer_steps,
                **objective.report(dict(zip(names, totals)))}

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
        return from_tensor(forward(self.engine, batch, self.temperature)[0], batch["response_mask"])

    def _tensors(self, table: pa.Table, columns: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        return {key: value.to(self.device) for key, value in to_tensors(table, self.pad_id, columns).items()}

    def _all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a few floats over the ranks (float64)."""
        if self.world_size == 1:
            return [float(v) for v in values]
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.deepspeed.comm.all_reduce(tensor)
        return tensor.tolist()

    def _update(self, loss: torch.Tensor) -> tuple[float, float]:
        """Backward and one optimizer step; returns (pre-clip global grad norm, lr used by this update)."""
        lr = self.current_lr()
        self.engine.backward(loss)
        own_norm = self._grad_norm_stage0()
        self.engine.step()
        self.optimizer_steps += 1
        norm = self.engine.get_global_grad_norm()
        norm = own_norm if norm is None else float(norm)
        if norm is not None and not math.isfinite(norm):
            # fp32 has no loss scaling to skip such a step: the weights are now garbage, so stop loudly (the run
            # resumes from the last checkpoint once the cause is fixed)
            raise FloatingPointError(f"optimizer step {self.optimizer_steps}: the gradient norm is {norm}; the "
                                     "objective's loss or its gradient is not finite")
        return (float("nan") if norm is None else norm), lr

    def _grad_norm_stage0(self) -> float | None:
        """Stage 0 in fp32 clips without reporting the norm; the gradients are already averaged here."""
        if self.zero_stage != 0 or self.engine.bfloat16_enabled():
            return None
        grads = [p.grad.detach().double() for p in self.engine.module.parameters() if p.grad is not None]
        return math.sqrt(sum(float(g.square().sum()) for g in grads)) if grads else 0.0

    def current_lr(self) -> float:
        return float(self.engine.get_lr()[0])

    # ------------------------------------------------------------------ weights and checkpoints (engines/*.py)

    def state_dict_for_rollout(self) -> dict[str, torch.Tensor] | None:
        return weights.state_dict(self)

    def parameter_checksum(self) -> float:
        return weights.checksum(self)

    def export_hf(self, out_dir: str | Path) -> str | None:
        return weights.export_hf(self, out_dir)

    def save_checkpoint(self, ckpt_dir: str | Path, client_state: dict | None = None, tag: str | None = None) -> str:
        return checkpoints.save(self, ckpt_dir, client_state, tag)

    def load_checkpoint(self, ckpt_dir: str | Path, tag: str | None = None) -> dict:
        return checkpoints.load(self, ckpt_dir, tag)
