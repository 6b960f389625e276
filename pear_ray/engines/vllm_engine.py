"""vLLM behind the rollout engine interface (`rollout_engine.RolloutEngine`: token ids in, `Sample`s out, in-place
weight reload). No Ray here; the rollout/scoring actor wraps this class.

The log-probs of the distribution that sampled are vLLM's `processed_logprobs` (logits / temperature, renormalised
over the top-p nucleus); teacher-forced scores are vLLM's prompt log-probs. vLLM refuses more top-k log-probs per
position than the engine's `max_logprobs` (default 20).

Prefix caching is on unless `args` turns it off (`enable_prefix_caching`; vLLM's default on CUDA and x86 CPUs,
made explicit): a multi-turn episode's next turn prefills only what the last turn and the observation added, and the
sampled tokens are the same as without it. A weight reload resets the cache; an adapter's prefixes are its own.

The engine runs in-process (no engine-core subprocess, "uni" executor, eager mode): on CPU that starts in ~2 s and
~0.7 GB instead of ~14 s and ~3 GB, and it is what lets `update_weights` hand tensors to the worker directly.
The same settings are valid for the GPU build of vLLM. There, CUDA graphs and torch.compile are worth having for
throughput: set `resources.rollout.engine.enforce_eager: false` and export TORCHDYNAMO_DISABLE=0 before this module
is imported. The options (`config.VllmOptions`) are the typed common ones plus `args`, passed to `vllm.LLM` as is.
"""

from __future__ import annotations

import gc
import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

# Must be set before vllm is imported (vllm reads and caches its env). setdefault: the caller's choice wins.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # CPU build only: don't pin OMP threads to cores
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # else the first logprobs call JIT-compiles C++ (2-17 s) on CPU

from pear_ray.config import VllmOptions  # noqa: E402
from pear_ray.engines.rollout_engine import (  # noqa: E402
    EngineError,
    Sample,
    TopK,
    check_model_dir,
    check_score_rows,
    check_weight_set,
    seed_per_prompt,
)

if TYPE_CHECKING:
    import torch

    from pear_ray.engines.adapters import AdapterWeights


def _topk(position: dict, k: int) -> TopK:
    """The k best (id, log-prob) of a position, best first. vLLM adds the actual token to its top k whatever its
    rank, so keep ranks 1..k; drop -inf entries (outside the top-p nucleus: not in the distribution's support)."""
    best = sorted(position.items(), key=lambda item: item[1].rank)[:k]
    return [(int(token), float(entry.logprob)) for token, entry in best if entry.logprob > -math.inf]


def _token_logprob(position: dict, token_id: int) -> float:
    """vLLM returns {token_id: Logprob} per position (top-k plus the actual token); take the actual token's."""
    return float(position[token_id].logprob)


def _checkpoint_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the folder's safetensors files (headers only): what a reload must provide."""
    from safetensors import safe_open

    shapes = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            shapes |= {k: tuple(sf.get_slice(k).get_shape()) for k in sf.keys()}
    return shapes


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

    def __init__(self, model_dir: str | Path, options: VllmOptions | None = None, *, seed: int = 0):
        self.llm, self.model_dir, self.version = None, check_model_dir(model_dir), 0
        self.lora = None  # the LoRARequest of the adapter served with the base weights, if any
        options = options or VllmOptions()
        if others := [str(e.model_dir) for e in VllmEngine._live if e.llm is not None]:
            raise EngineError(f"cannot start an engine on {self.model_dir}: this process already runs one on "
                              f"{others[0]}; vLLM allows one per process, shut it down first")
        from vllm import LLM  # imported late: heavy, and only actors that serve need it

        try:
            self.llm = LLM(model=str(self.model_dir), seed=seed, distributed_executor_backend="uni",
                           logprobs_mode="processed_logprobs", enable_lora=options.max_lora_rank is not None,
                           max_loras=1, **{"enable_prefix_caching": True, **options.args},
                           **options.model_dump(exclude={"backend", "args"}, exclude_none=True))  # null: vLLM's
        except Exception as exc:
            raise EngineError(f"vLLM failed to start on model folder {self.model_dir}: "
                              f"{type(exc).__name__}: {exc}") from exc
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self._shapes = _checkpoint_shapes(self.model_dir)
        self.prefill_counts = {"prompt_tokens": 0, "cached_tokens": 0}
        self._tied = bool(getattr(self.llm.llm_engine.model_config.hf_config, "tie_word_embeddings", False))
        # adapters as peft folders: vLLM 0.32 loads a LoRA from a path only
        self._adapter_dir = Path(tempfile.mkdtemp(prefix="pear_ray-lora-")) if options.max_lora_rank else None
        VllmEngine._live.add(self)

    def _run(self, prompts: list[list[int]], params) -> list:
        if self.llm is None:
            raise EngineError(f"the engine on {self.model_dir} was shut down")
        return self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False,
                                 lora_request=self.lora)

    def generate(self, prompts: list[list[int]], *, n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 max_tokens: int = 32, seed: int | list[int] | None = None, stop_token_ids: list[int] | None = None,
                 ignore_eos: bool = False, topk: int = 0) -> list[list[Sample]]:
        """`RolloutEngine.generate`; sample j of a prompt uses its seed + j through vLLM's parallel sampling."""
        from vllm import SamplingParams

        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=s,
                                 stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, logprobs=topk, detokenize=False)
                  for s in seed_per_prompt(seed, prompts)]
        outputs, start = [], 0
        for part in self._one_step_parts(prompts, n) if seed is not None else [prompts]:
            outputs.extend(self._run(part, params[start:start + len(part)]))
            start += len(part)
        self.prefill_counts["prompt_tokens"] += sum(len(out.prompt_token_ids) for out in outputs)
        self.prefill_counts["cached_tokens"] += sum(out.num_cached_tokens or 0 for out in outputs)
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
        """`RolloutEngine.score` via vLLM's prompt log-probs."""
        from vllm import SamplingParams

        check_score_rows(prompts, responses, self.max_model_len - 1)  # room for the one (discarded) output token
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

        Only the checkpoint's exact set is taken: vLLM 0.32's layer-wise reload moves parameters to the meta device
        first, so an unknown name or a wrong shape raises half-way and leaves the engine unusable (a later reload can
        even hang), and a fused layer (qkv, gate_up) given only part of its weights is silently reprocessed from
        garbage. `reload_weights` is the worker method in vLLM 0.32 (Worker.reload_weights ->
        model_runner.reload_weights -> model_loader.reload.inplace.reload_weights(weights_iterator=...,
        is_checkpoint_format=True)): it runs the model's own load_weights and re-does post-load processing, e.g. the
        CPU backend's linear-weight repacking, which is why `apply_model(load_weights)` is wrong on CPU. The prefix
        cache holds KV of the old weights.
        """
        if self.llm is None:
            raise EngineError(f"the engine on {self.model_dir} was shut down")
        weights = list(named_tensors)  # references only
        # a trainer's state_dict repeats a tied head, which the checkpoint (and vLLM) may not have
        tied = {"lm_head.weight"} - set(self._shapes) if self._tied else set()
        if self._shapes:  # none for a folder without safetensors (e.g. .bin weights): nothing to check against
            check_weight_set(weights, self._shapes, self.model_dir, tied=tied)
        weights = [(name, t) for name, t in weights if name not in tied]
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        except Exception as exc:
            raise EngineError(f"weight reload into the engine on {self.model_dir} failed; its weights may now be "
                              f"partly unloaded, restart it: {type(exc).__name__}: {exc}") from exc
        if self._tied:
            self.llm.collective_rpc(_refresh_tied_head)
        self.llm.reset_prefix_cache()
        self._drop_adapter()
        self.version += 1
        return self.version

    def update_adapter(self, adapter: AdapterWeights) -> int:
        """`RolloutEngine.update_adapter` through vLLM's multi-LoRA serving: the adapter is written as a peft folder
        into this engine's scratch folder and added as a LoRARequest whose id is the new weight version, so vLLM
        loads fresh weights (it caches adapters by id) and the prefix cache (keyed by adapter name and path) cannot
        serve KV of an older one. Every generation and score then passes it. The old adapter leaves vLLM and the
        disk: the engine holds one (max_loras = 1)."""
        from vllm.lora.request import LoRARequest

        if self.llm is None:
            raise EngineError(f"the engine on {self.model_dir} was shut down")
        if self._adapter_dir is None:
            raise EngineError(f"the engine on {self.model_dir} was started without LoRA: set "
                              f"resources.rollout.engine.max_lora_rank to at least the adapter's r ({adapter.r})")
        version = self.version + 1
        request = LoRARequest(f"policy-{version}", version, str(adapter.save(self._adapter_dir / str(version))))
        try:  # vLLM loads and checks it now (rank, target modules), not at the next generation
            self.llm.llm_engine.add_lora(request)
        except Exception as exc:
            shutil.rmtree(request.lora_path)
            raise EngineError(f"vLLM refused the adapter for {self.model_dir} (the engine keeps serving the one "
                              f"before): {type(exc).__name__}: {exc}") from exc
        self._drop_adapter()
        self.lora, self.version = request, version
        return self.version

    def _drop_adapter(self) -> None:
        """Serve the base weights alone; the adapter leaves vLLM's cache and the scratch folder."""
        if self.lora is not None:
            self.llm.llm_engine.remove_lora(self.lora.lora_int_id)
            shutil.rmtree(self.lora.lora_path)
            self.lora = None

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
        if getattr(self, "_adapter_dir", None) is not None:
            shutil.rmtree(self._adapter_dir, ignore_errors=True)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()  # tears down the worker and vLLM's torch.distributed state
            del llm
            gc.collect()
