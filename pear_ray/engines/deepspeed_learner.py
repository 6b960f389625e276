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

Micro-batches. By default an update is one forward of its rows padded to the longest. With
`max_tokens_per_micro_batch` the rows are cut into micro-batches of at most that many tokens and each is packed
without padding (engines/packing.py); the objective still sees every micro-batch's rows on a padded grid. Their
gradients accumulate (DeepSpeed's accumulation boundary set by hand on the last one) into one optimizer update, so
a packed update equals the padded one. Every micro-batch's loss is divided by the update's global size, which must
be known before the first backward: the learner sums it in a pre-pass over the micro-batches, calling the
objective on zero log-probs, or on a no-grad forward's when the objective says its size reads them
(`size_reads_model`: PEAR normalised by its weights). Rows are never split, so per-row weights (PEAR's block and
sequence levels) are those of the whole row. All ranks run the same number of forward and backward passes, each
update's most over the ranks (ZeRO reduces gradients and ZeRO-3 gathers parameters in them): a rank with fewer
runs one-token fillers whose loss is 0.

Every public method is collective: all ranks of a group must call it, in the same order (ZeRO-3 gathers
parameters inside forward, and every update all-reduces).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

from pear_ray.data.tensors import from_tensor, to_tensors, token_counts
from pear_ray.engines import checkpoints, weights
from pear_ray.engines import lora as adapters
from pear_ray.engines.deepspeed_setup import build_engine, join_process_group, prepare_deepspeed, seed_everything
from pear_ray.engines.hf_scorer import forward
from pear_ray.engines.packing import micro_batch_bounds
from pear_ray.objectives import ObjectiveConfig, ObjectiveInputs
from pear_ray.objectives.pear import divide

if TYPE_CHECKING:
    from pear_ray.config import LoraConfig


class DeepSpeedLearner:
    """One data-parallel rank of the learner.

    model_dir: a Hugging Face causal-LM folder (weights, config, tokenizer), trained in fp32, or with `bf16=True`
    (GPU) in bf16 with fp32 master weights; zero_stage 0-3. Gradient clipping is DeepSpeed's (`grad_clip`); the
    LR schedule warms up linearly over `warmup_steps`, then stays constant or decays (cosine, linear) to 0 at
    `total_steps`. `temperature` is the rollouts' sampling temperature: on-policy objectives and `logprobs` see
    logits / temperature, the distribution the rollout sampled from, so importance ratios compare like with like;
    other objectives train the model's own distribution. `max_tokens_per_micro_batch` (None or 0: one padded
    forward per update) bounds the tokens of one packed forward (module docstring). `lora`: train
    low-rank adapters on the frozen model instead of every weight (engines/lora.py); the weights handed out and
    exported are still the plain model's, with the adapters merged, and checkpoints hold only the adapters.
    """

    def __init__(self, model_dir: str | Path, *, rank: int = 0, world_size: int = 1, master_addr: str = "127.0.0.1",
                 master_port: int = 29500, zero_stage: int = 2, lr: float = 1e-5, weight_decay: float = 0.0,
                 grad_clip: float = 1.0, warmup_steps: int = 0, total_steps: int | None = None,
                 lr_schedule: str = "constant", seed: int = 0, bf16: bool = False, local_rank: int = 0,
                 num_threads: int | None = None, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 temperature: float = 1.0, max_tokens_per_micro_batch: int | None = None,
                 lora: LoraConfig | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
        self.model_dir = Path(model_dir)
        self.rank, self.world_size, self.zero_stage = rank, world_size, zero_stage
        self.temperature = temperature
        self.lora = lora
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch or None  # None: pad, one forward per update
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
            lr_schedule=lr_schedule, bf16=bf16, betas=betas, eps=eps, lora=lora)
        self.device = self.engine.device
        self.dropout = adapters.dropout_layers(self.engine.module)  # LoRA's, on in training forwards only

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
        updates = self._aligned([self._micro_batches(table.slice(int(a), int(b - a)), columns)
                                 for a, b in zip(bounds[:-1], bounds[1:])])
        # One update per step sees the weights the samples are scored at: its own forward gives logp_old (detached),
        # bit for bit the no-grad pass's, so that pass is skipped; not under adapter dropout, which that forward has.
        own_old = on_policy and minibatches == epochs == 1 and not self.dropout
        if on_policy and not own_old:
            with torch.no_grad():
                for micro_batches in updates:
                    for micro in micro_batches:
                        if micro is None:
                            self._filler()
                        else:
                            micro["logp_old"] = self._forward(micro, temperature)[0]

        losses, grad_norms, sums, lr = [], [], {}, 0.0
        for _ in range(epochs):
            for micro_batches in updates:
                # one micro-batch (always without a budget): its own size, summed over the ranks, is the update's
                global_size = (self._global_size(micro_batches, objective, temperature, own_old)
                               if len(micro_batches) > 1 else None)
                update_loss = 0.0
                for index, micro in enumerate(micro_batches):
                    self.engine.set_gradient_accumulation_boundary(index == len(micro_batches) - 1)
                    if micro is None:
                        loss = self._filler()
                    else:
                        with adapters.dropout_on(self.dropout):
                            terms = objective.loss(self._inputs(micro, temperature, own_old))
                        if global_size is None:
                            [global_size] = self._all_reduce_sum([float(terms.size)])
                        loss = divide(terms.total, global_size / self.world_size)
                        for name, value in terms.stats.items():
                            sums[name] = sums.get(name, 0.0) + float(value)
                    self.engine.backward(loss)
                    update_loss += float(loss.detach())
                norm, lr = self._optimizer_step()
                losses.append(update_loss)
                grad_norms.append(norm)
        names = sorted(sums)
        loss_sum, *totals = self._all_reduce_sum([sum(losses), *(sums[name] for name in names)])
        return {"loss": loss_sum / self.world_size / len(losses), "grad_norm": float(np.mean(grad_norms)),
                "lr": lr, "updates": len(losses), "step": self.optimizer_steps,
                **objective.report(dict(zip(names, totals)))}

    def reference_logprobs(self, table: pa.Table) -> pa.ListArray:
        """`logprobs` under the frozen base, LoRA's adapters switched off: RL's KL reference when it is the start
        model, scored without a second copy of it."""
        if self.lora is None:
            raise ValueError("reference_logprobs needs LoRA: without adapters the learner has no frozen base")
        with self.engine.module.disable_adapter():
            return self.logprobs(table)

    @torch.no_grad()
    def logprobs(self, table: pa.Table) -> pa.ListArray:
        """log pi(response token | prefix) under the current weights and `temperature`, one list<float32> per row
        (0.0 at the environment's tokens of a multi-turn row), micro-batched like a step.

        A rank may get no rows (a batch smaller than the group): it still runs as many (one-token) forwards as the
        busiest rank, because under ZeRO-3 every rank must take part in the parameter all-gathers.
        """
        [micro_batches] = self._aligned([self._micro_batches(table)])
        pieces = []
        for micro in micro_batches:
            if micro is None:
                self._filler()
            else:
                logp = self._forward(micro, self.temperature)[0]
                pieces.append(from_tensor(logp, micro["response_positions"], micro["response_mask"]))
        return pa.concat_arrays(pieces) if pieces else pa.array([], type=pa.list_(pa.float32()))

    def _micro_batches(self, table: pa.Table, columns: tuple[str, ...] = ()) -> list[dict[str, torch.Tensor]]:
        """The rows' tensors: all of them padded as one micro-batch without a budget, else cut by the budget."""
        if self.max_tokens_per_micro_batch is None:
            return [self._tensors(table, columns)] if table.num_rows else []
        return [self._tensors(table.slice(start, end - start), columns)
                for start, end in micro_batch_bounds(token_counts(table), self.max_tokens_per_micro_batch)]

    def _aligned(self, updates: list[list]) -> list[list]:
        """Each update's micro-batches followed by None (a filler) up to the most any rank has for that update."""
        counts = self._all_reduce_max([len(micro_batches) for micro_batches in updates])
        return [micro_batches + [None] * (int(count) - len(micro_batches))
                for micro_batches, count in zip(updates, counts)]

    def _forward(self, micro: dict[str, torch.Tensor], temperature: float):
        """(log-probs [B, L], candidates): hf_scorer.forward, packed under a token budget."""
        return forward(self.engine, micro, temperature, packed=self.max_tokens_per_micro_batch is not None)

    def _inputs(self, micro: dict[str, torch.Tensor], temperature: float, own_old: bool = False) -> ObjectiveInputs:
        """The objective's inputs from a forward; `own_old`: that forward's detached log-probs are logp_old."""
        logp, candidates = self._forward(micro, temperature)
        logp_old = logp.detach() if own_old else micro.get("logp_old")
        return ObjectiveInputs(logp=logp, mask=micro["response_mask"], columns=micro, logp_old=logp_old,
                               logprobs_at=candidates)

    def _filler(self) -> torch.Tensor:
        """A one-token forward whose loss is 0, with a zero gradient for every parameter: the pass of a rank that
        has no micro-batch left while another rank has one."""
        dummy = torch.full((1, 1), self.pad_id, dtype=torch.long, device=self.device)
        return self.engine(input_ids=dummy, attention_mask=torch.ones_like(dummy)).logits.sum() * 0.0

    @torch.no_grad()
    def _global_size(self, micro_batches: list, objective: ObjectiveConfig, temperature: float,
                     own_old: bool = False) -> float:
        """The update's loss divisor summed over the ranks, before any of its backward passes: the objective on
        zero log-probs, which leave its size as it is, or on a no-grad forward's at the weights the update starts
        from when its size reads them."""
        reads_model = objective.size_reads_model()
        size = 0.0
        for micro in micro_batches:
            if micro is None:
                if reads_model:
                    self._filler()
                continue
            if reads_model:
                inputs = self._inputs(micro, temperature, own_old)
            else:
                zeros = torch.zeros(micro["response_mask"].shape, dtype=torch.float32, device=self.device)
                inputs = ObjectiveInputs(logp=zeros, mask=micro["response_mask"], columns=micro,
                                         logp_old=zeros if own_old else micro.get("logp_old"),
                                         logprobs_at=lambda ids: torch.zeros(ids.shape, device=ids.device))
            size += float(objective.loss(inputs).size)
        return self._all_reduce_sum([size])[0]

    def _tensors(self, table: pa.Table, columns: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        return {key: value.to(self.device) for key, value in to_tensors(table, self.pad_id, columns).items()}

    def _all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a few floats over the ranks (float64)."""
        return self._all_reduce(values, self.deepspeed.comm.ReduceOp.SUM)

    def _all_reduce_max(self, values: list[float]) -> list[float]:
        return self._all_reduce(values, self.deepspeed.comm.ReduceOp.MAX)

    def _all_reduce(self, values: list[float], op) -> list[float]:
        if self.world_size == 1:
            return [float(v) for v in values]
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.deepspeed.comm.all_reduce(tensor, op=op)
        return tensor.tolist()

    def _optimizer_step(self) -> tuple[float, float]:
        """One optimizer step on the accumulated gradients; returns (pre-clip global grad norm, lr it used)."""
        lr = self.current_lr()
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

    def adapter_for_rollout(self):
        return weights.adapter(self)

    def policy_nbytes(self) -> int:
        return weights.policy_nbytes(self)

    def full_weights(self):
        """(HF name, tensor) of every parameter and persistent buffer as this rank holds them, uncopied (under LoRA
        the merged ones are new tensors): for a rollout engine in this process (ZeRO 0-2 keep the full weights on
        every rank)."""
        return weights.gathered_params(self, to_all=True)

    def parameter_checksum(self) -> float:
        return weights.checksum(self)

    def export_hf(self, out_dir: str | Path) -> str | None:
        return weights.export_hf(self, out_dir)

    def save_checkpoint(self, ckpt_dir: str | Path, client_state: dict | None = None, tag: str | None = None) -> str:
        return checkpoints.save(self, ckpt_dir, client_state, tag)

    def load_checkpoint(self, ckpt_dir: str | Path, tag: str | None = None) -> dict:
        return checkpoints.load(self, ckpt_dir, tag)
