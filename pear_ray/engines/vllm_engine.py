"""vLLM behind a small token-id interface: generate with sampled-token log-probs, teacher-forced scoring, and
in-place weight reload. No Ray here; the rollout/scoring actor wraps this class.

Log-probs are those of the distribution that sampled (vLLM's `processed_logprobs`: logits / temperature, renormalised
over the top-p nucleus), not of the raw model, since PEAR's behaviour log-probs and RL's importance ratios are
ratios against the sampler. Teacher-forced scores sample nothing: they are of logits / temperature. Either can also
return each response token's top-k next tokens under that same distribution (`topk`), for a distillation loss; vLLM
refuses more than the engine's `max_logprobs` (default 20) per position.

The engine runs in-process (no engine-core subprocess, "uni" executor, eager mode): on CPU that starts in ~2 s and
~0.7 GB instead of ~14 s and ~3 GB, and it is what lets `update_weights` hand tensors to the worker directly.
The same settings are valid for the GPU build of vLLM. There, CUDA graphs and torch.compile are worth having for
throughput: pass `enforce_eager=False` and export TORCHDYNAMO_DISABLE=0 before importing this module.
"""

from __future__ import annotations

import gc
import math
import os
import weakref
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

# Must be set before vllm is imported (vllm reads and caches its env). setdefault: the caller's choice wins.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # CPU build only: don't pin OMP threads to cores
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # else the first logprobs call JIT-compiles C++ (2-17 s) on CPU

from pear_ray.models import IncompleteModel, check_model_files  # noqa: E402

if TYPE_CHECKING:
    import torch

TopK = list[tuple[int, float]]  # one position's top-k next tokens as (id, log-prob), best first


class EngineError(RuntimeError):
    """The engine could not start or serve; the message names the model folder."""


@dataclass
class Sample:
    response_ids: list[int]
    logprobs: list[float]  # log-prob of each sampled token under the distribution that sampled it (see the top)
    finish_reason: str  # "stop" (EOS / stop token) or "length"
    topk: list[TopK] = field(default_factory=list)  # with generate(topk=k > 0): one per response token


def _topk(position: dict, k: int) -> TopK:
    """The k best (id, log-prob) of a position, best first. vLLM adds the actual token to its top k whatever its
    rank, so keep ranks 1..k; drop -inf entries (outside the top-p nucleus: not in the distribution's support)."""
    best = sorted(position.items(), key=lambda item: item[1].rank)[:k]
    return [(int(token), float(entry.logprob)) for token, entry in best if entry.logprob > -math.inf]


def _token_logprob(position: dict, token_id: int) -> float:
    """vLLM returns {token_id: Logprob} per position (top-k plus the actual token); take the actual token's."""
    return float(position[token_id].logprob)


def check_model_dir(model_dir: str | Path) -> Path:
    """Fail fast with a readable error instead of a vLLM stack dump for a missing or incomplete model folder."""
    try:
        return check_model_files(Path(model_dir), f"model folder {model_dir}")
    except IncompleteModel as error:
        raise EngineError(str(error)) from None


def _checkpoint_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the folder's safetensors files (headers only): what a reload must provide."""
    from safetensors import safe_open

    shapes = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            shapes |= {k: tuple(sf.get_slice(k).get_shape()) for k in sf.keys()}
    return shapes


def _check_weights(weights: list[tuple[str, torch.Tensor]], shapes: dict[str, tuple[int, ...]], model_dir) -> None:
    """vLLM 0.32's layer-wise reload moves parameters to the meta device first: an unknown name or a wrong shape
    raises half-way and leaves the engine unusable (a later reload can even hang), and a fused layer (qkv, gate_up)
    given only part of its weights is silently reprocessed from garbage. So refuse anything but a full, exact set."""
    if not shapes:  # no safetensors in the folder (e.g. .bin weights): nothing to check against
        return
    got = {name: tuple(t.shape) for name, t in weights}
    unknown, missing = sorted(set(got) - set(shapes)), sorted(set(shapes) - set(got))
    wrong = [f"{n} {got[n]} != {shapes[n]}" for n in sorted(set(got) & set(shapes)) if got[n] != shapes[n]]
    if unknown or missing or wrong or len(got) != len(weights):
        raise ValueError(f"update_weights for {model_dir} needs exactly the checkpoint's {len(shapes)} tensors: "
                         f"unknown {unknown[:5]}, missing {missing[:5]}, wrong shapes {wrong[:5]}, "
                         f"duplicates {len(weights) - len(got)} (nothing was loaded)")


def _logit_scale(worker, scale: float | None) -> float:
    """Runs on the worker: the factor vLLM's LogitsProcessor multiplies the logits by, set first when given."""
    processor = worker.get_model().logits_processor
    if scale is not None:
        processor.scale = scale
    return processor.scale


def _refresh_tied_head(worker) -> None:
    """Runs on the worker after a reload of a model with tied embeddings. The layer-wise reload re-processes the
    embedding but not the LM head that shares its weight, and on CPU the head computes with a copy packed at
    start-up, so it would keep scoring with the old embedding. Re-processing the head repacks it (a no-op on GPU)."""
    head = getattr(worker.get_model(), "lm_head", None)
    if head is not None and hasattr(head, "quant_method"):
        head.quant_method.process_weights_after_loading(head)


class VllmEngine:
    """One in-process vLLM engine over a Hugging Face model folder; all inputs and outputs are token ids.

    One live engine per process (one per Ray actor): vLLM keeps its parallel state process-global, and shutting one
    engine down tears it down under any other ("pipeline model parallel group is not initialized"), so a second
    start is refused until the first is shut down.
    """

    _live: ClassVar[weakref.WeakSet] = weakref.WeakSet()

    def __init__(self, model_dir: str | Path, *, dtype: str = "float32", seed: int = 0,
                 kv_cache_memory_bytes: int | None = 64 * 2**20, max_model_len: int | None = None,
                 enforce_eager: bool = True, **engine_kwargs: Any):
        self.llm, self.model_dir, self.version = None, check_model_dir(model_dir), 0
        if others := [str(e.model_dir) for e in VllmEngine._live if e.llm is not None]:
            raise EngineError(f"cannot start an engine on {self.model_dir}: this process already runs one on "
                              f"{others[0]}; vLLM allows one per process, shut it down first")
        from vllm import LLM  # imported late: heavy, and only actors that serve need it

        try:
            self.llm = LLM(model=str(self.model_dir), dtype=dtype, seed=seed, max_model_len=max_model_len,
                           kv_cache_memory_bytes=kv_cache_memory_bytes, enforce_eager=enforce_eager,
                           distributed_executor_backend="uni", logprobs_mode="processed_logprobs", **engine_kwargs)
        except Exception as exc:
            raise EngineError(f"vLLM failed to start on model folder {self.model_dir}: "
                              f"{type(exc).__name__}: {exc}") from exc
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self._shapes = _checkpoint_shapes(self.model_dir)
        self._tied = bool(getattr(self.llm.llm_engine.model_config.hf_config, "tie_word_embeddings", False))
        VllmEngine._live.add(self)

    def _run(self, prompts: list[list[int]], params) -> list:
        if self.llm is None:
            raise EngineError(f"the engine on {self.model_dir} was shut down")
        return self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)

    def generate(self, prompts: list[list[int]], *, n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 max_tokens: int = 32, seed: int | list[int] | None = None, stop_token_ids: list[int] | None = None,
                 ignore_eos: bool = False, topk: int = 0) -> list[list[Sample]]:
        """n samples per prompt with the log-prob of every sampled token under the distribution that sampled it (after
        temperature and top-p; at temperature 0, greedy, the raw model's), and with topk > 0 that distribution's
        top-k at every position. `seed` is one seed for every prompt or one per prompt (so prompts do not share
        their random draws); sample j of a prompt uses its seed + j (vLLM's parallel sampling), so the same call
        returns the same samples."""
        from vllm import SamplingParams

        seeds = seed if isinstance(seed, list) else [seed] * len(prompts)
        if len(seeds) != len(prompts):
            raise ValueError(f"generate: {len(seeds)} seeds for {len(prompts)} prompts")
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=s,
                                 stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, logprobs=topk, detokenize=False)
                  for s in seeds]
        outputs, start = [], 0
        for part in self._one_step_parts(prompts, n) if seed is not None else [prompts]:
            outputs.extend(self._run(part, params[start:start + len(part)]))
            start += len(part)
        results = []
        for out in outputs:
            results.append([
                Sample(response_ids=list(c.token_ids),
                       logprobs=[_token_logprob(pos, t) for pos, t in zip(c.logprobs, c.token_ids, strict=True)],
                       finish_reason=str(c.finish_reason),
                       topk=[_topk(pos, topk) for pos in c.logprobs] if topk else [])
                for c in out.outputs
            ])
        return results

    def _one_step_parts(self, prompts: list[list[int]], n: int) -> list[list[list[int]]]:
        """Prompts cut into calls whose prefills all fit in one scheduler step.

        vLLM 0.32's CPU runner crashes ("CPU Generator does not use offset") when a seeded request's prefill is
        split over steps (it rewinds the request's generator, which CPU generators cannot do); a call whose
        prompts fit the step's token and sequence budgets never splits one.
        """
        scheduler = self.llm.llm_engine.vllm_config.scheduler_config
        token_budget, seq_budget = scheduler.max_num_batched_tokens, scheduler.max_num_seqs
        parts, part, tokens = [], [], 0
        for prompt in prompts:
            if part and (tokens + n * len(prompt) > token_budget or n * (len(part) + 1) > seq_budget):
                parts.append(part)
                part, tokens = [], 0
            part.append(prompt)
            tokens += n * len(prompt)
        return [*parts, part] if part else parts

    def score(self, prompts: list[list[int]], responses: list[list[int]], temperature: float = 1.0,
              topk: int = 0) -> list[list[float]] | tuple[list[list[float]], list[list[TopK]]]:
        """Teacher-forced log p(response_t | prompt, response_<t) for every response token, via prompt_logprobs, of
        logits / temperature; with topk > 0, (those, each response token's top-k as in `Sample.topk`)."""
        from vllm import SamplingParams

        if len(prompts) != len(responses):
            raise ValueError(f"score: {len(prompts)} prompts but {len(responses)} responses")
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            if not p or not r:
                raise ValueError(f"score: row {i} has an empty {'prompt' if not p else 'response'}")
            if len(p) + len(r) >= self.max_model_len:  # vLLM needs room for the one (discarded) output token
                raise ValueError(f"score: row {i} has {len(p)} + {len(r)} tokens; at most max_model_len - 1 = "
                                 f"{self.max_model_len - 1} can be scored")
        params = SamplingParams(max_tokens=1, prompt_logprobs=topk, detokenize=False)
        with self._logits_divided_by(temperature):
            outs = self._run([list(p) + list(r) for p, r in zip(prompts, responses, strict=True)], params)
        positions = [out.prompt_logprobs[len(p):] for out, p in zip(outs, prompts, strict=True)]
        logprobs = [[_token_logprob(pos, tok) for pos, tok in zip(row, r, strict=True)]
                    for row, r in zip(positions, responses, strict=True)]
        if not topk:
            return logprobs
        return logprobs, [[_topk(pos, topk) for pos in row] for row in positions]

    @contextmanager
    def _logits_divided_by(self, temperature: float):
        """Prompt log-probs of logits / temperature inside: they skip the sampler (which divides only what it samples
        from), so the model's logit scale, which vLLM's LogitsProcessor multiplies every logit by, is divided."""
        if temperature == 1.0:
            yield
            return
        [scale] = self.llm.collective_rpc(_logit_scale, args=(None,))
        self.llm.collective_rpc(_logit_scale, args=(scale / temperature,))
        try:
            yield
        finally:
            self.llm.collective_rpc(_logit_scale, args=(scale,))

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load new weights (Hugging Face checkpoint names, e.g. a trainer's state_dict items) in place.

        `reload_weights` is the worker method in vLLM 0.32 (Worker.reload_weights -> model_runner.reload_weights
        -> model_loader.reload.inplace.reload_weights(weights_iterator=..., is_checkpoint_format=True)): it runs the
        model's own load_weights and re-does post-load processing, e.g. the CPU backend's linear-weight repacking,
        which is why `apply_model(load_weights)` is wrong on CPU. The prefix cache holds KV of the old weights.
        """
        if self.llm is None:
            raise EngineError(f"the engine on {self.model_dir} was shut down")
        weights = list(named_tensors)  # references only; checked in full first, see _check_weights
        if self._tied:  # a trainer's state_dict repeats the tied head; the checkpoint (and vLLM) have none
            weights = [(n, t) for n, t in weights if n != "lm_head.weight" or n in self._shapes]
        _check_weights(weights, self._shapes, self.model_dir)
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        except Exception as exc:
            raise EngineError(f"weight reload into the engine on {self.model_dir} failed; its weights may now be "
                              f"partly unloaded, restart it: {type(exc).__name__}: {exc}") from exc
        if self._tied:
            self.llm.collective_rpc(_refresh_tied_head)
        self.llm.reset_prefix_cache()
        self.version += 1
        return self.version

    def health(self) -> dict:
        """Model folder, weight version and a one-token greedy generation as a liveness check (~ms); never raises."""
        from vllm import SamplingParams

        info: dict[str, Any] = {"model_dir": str(self.model_dir), "version": self.version}
        try:
            out = self._run([[0]], SamplingParams(max_tokens=1, temperature=0.0, detokenize=False))
            return info | {"alive": len(out[0].outputs[0].token_ids) == 1}
        except Exception as exc:  # a probe reports, the caller decides
            return info | {"alive": False, "error": f"{type(exc).__name__}: {exc}"}

    def shutdown(self) -> None:
        """Free the engine (and its KV cache); the object is unusable afterwards."""
        llm, self.llm = getattr(self, "llm", None), None
        VllmEngine._live.discard(self)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()  # tears down the worker and vLLM's torch.distributed state
            del llm
            gc.collect()
