"""The rollout service's second backend: generation and teacher-forced scoring with the model's own transformers
forward, in the actor's process. For small models on CPU, where vLLM's per-step scheduling costs more than the
model itself (a 2-layer model: vLLM ~6 ms a decode step, this loop ~2 ms); vLLM is the backend for everything else.

Same interface and meaning as `VllmEngine` (`rollout_engine.RolloutEngine`): sample j of a prompt is drawn from its
own generator seeded `seed + j`, by Gumbel-max over the sampling distribution. Teacher-forced scores come from the
learner's own forward (`hf_scorer.teacher_forced`).

Like vLLM's prefix caching, the engine keeps the KV of what it has run (`PrefixCache`, keyed by the exact ids) and a
later prompt that starts with the same ids prefills only the rest: a multi-turn episode's next turn runs the
observation's ids, not the whole conversation again. The result is that of a fresh generation from the full context,
within float round-off (the same positions and attention, in another batch shape).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import torch
import torch.nn.functional as F

from pear_ray.config import TransformersOptions
from pear_ray.data import schema
from pear_ray.data.tensors import from_tensor, to_tensors
from pear_ray.engines.hf_scorer import teacher_forced
from pear_ray.engines.rollout_engine import (
    EngineError,
    Sample,
    TopK,
    check_model_dir,
    check_score_rows,
    check_weight_set,
    seed_per_prompt,
)

if TYPE_CHECKING:
    from pear_ray.engines.adapters import AdapterWeights

NOISE_FLOATS = 2**22  # sampling noise drawn ahead per call, at most (16 MiB)
PREFIX_CACHE_BYTES = 256 * 2**20  # KV of past prefixes kept, at most (least recently used dropped first)

LayerKV = list[tuple[torch.Tensor, torch.Tensor]]  # one sequence's (keys, values) per layer, [heads, tokens, head_dim]


class PrefixCache:
    """The KV of token sequences the engine has run, by their exact ids; a prompt reuses the longest prefix it shares
    with one of them (KV at a position depends on the ids up to it only). Found as vLLM finds its blocks: by a
    chained hash of each whole `BLOCK` of ids, so a lookup costs the prompt's length, not the cache's; the prefix
    found is then extended id by id. A prefix shorter than one block is not looked for (its prefill is cheap). Least
    recently used dropped past `budget_bytes`."""

    BLOCK = 16

    def __init__(self, budget_bytes: int):
        self.budget_bytes, self.bytes = budget_bytes, 0
        self.entries: OrderedDict[tuple[int, ...], LayerKV] = OrderedDict()
        self.blocks: dict[int, tuple[int, ...]] = {}  # chained hash of ids[:k * BLOCK] -> an entry starting so

    @classmethod
    def _block_hashes(cls, ids: tuple[int, ...]) -> list[int]:
        """hashes[k - 1] stands for ids[:k * BLOCK], each whole block chained onto the one before."""
        hashes, running = [], 0
        for end in range(cls.BLOCK, len(ids) + 1, cls.BLOCK):
            running = hash((running, ids[end - cls.BLOCK:end]))
            hashes.append(running)
        return hashes

    def longest(self, ids: list[int]) -> tuple[int, LayerKV | None]:
        """(n, KV of ids[:n]) for the longest cached prefix, leaving at least the last id to run; (0, None) if none."""
        wanted = tuple(ids[:-1])
        key = next((self.blocks[h] for h in reversed(self._block_hashes(wanted)) if h in self.blocks), None)
        shared = 0 if key is None else len(os.path.commonprefix([key, wanted]))  # a hash collision shares less
        if not shared:
            return 0, None
        self.entries.move_to_end(key)
        return shared, [(k[:, :shared], v[:, :shared]) for k, v in self.entries[key]]

    def put(self, ids: list[int], kv: LayerKV) -> None:
        key = tuple(ids)
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        self.entries[key] = kv
        self.blocks.update(dict.fromkeys(self._block_hashes(key), key))
        self.bytes += _nbytes(kv)
        while self.bytes > self.budget_bytes and self.entries:
            old, old_kv = self.entries.popitem(last=False)
            self.bytes -= _nbytes(old_kv)
            for h in self._block_hashes(old):
                if self.blocks.get(h) == old:
                    del self.blocks[h]

    def clear(self) -> None:
        self.entries.clear()
        self.blocks.clear()
        self.bytes = 0


def _nbytes(kv: LayerKV) -> int:
    return sum(k.nbytes + v.nbytes for k, v in kv)


class TransformersEngine:
    """A transformers causal LM with a KV-cache sampling loop; rows of a call are padded on the left."""

    def __init__(self, model_dir: str | Path, options: TransformersOptions | None = None, *, seed: int = 0,
                 model: torch.nn.Module | None = None):
        """`model`: serve this already loaded model of the folder (in eval mode) instead of loading one; its weights
        are then whatever its owner made them (colocated RL: the learner rank's training module)."""
        from transformers import AutoModelForCausalLM, GenerationConfig

        options = options or TransformersOptions()
        self.model_dir, self.version, self.max_rows = check_model_dir(model_dir), 0, options.max_rows
        self.borrowed = model is not None
        # A borrowed model's owner changes its weights without a word to the engine: no KV of old weights is kept.
        self.prefixes = None if self.borrowed else PrefixCache(PREFIX_CACHE_BYTES)
        self.prefill_counts = {"prompt_tokens": 0, "cached_tokens": 0}
        self.lora_shape: tuple[int, float, tuple[str, ...]] | None = None  # (r, alpha, targets) of its LoRA layers
        try:
            self.model = model if model is not None else AutoModelForCausalLM.from_pretrained(
                self.model_dir, dtype=getattr(torch, options.dtype)).eval()
        except Exception as exc:
            raise EngineError(f"transformers failed to load model folder {self.model_dir}: "
                              f"{type(exc).__name__}: {exc}") from exc
        config = self.model.config
        self.vocab_size, self.max_model_len = config.vocab_size, config.max_position_embeddings
        eos = [config.eos_token_id]
        if (self.model_dir / "generation_config.json").is_file():
            eos.append(GenerationConfig.from_pretrained(self.model_dir).eos_token_id)
        self.eos_ids = sorted({i for ids in eos for i in (ids if isinstance(ids, list) else [ids]) if i is not None})
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else 0
        self.generator = torch.Generator().manual_seed(seed)  # for calls without a seed
        state = self.model.state_dict()
        self.shapes = {name: tuple(t.shape) for name, t in state.items()}
        # A tied head is one tensor under two names: a learner sends it once, a state_dict twice.
        self.tied = set(state) - {name for name, _ in self.model.named_parameters()} - {
            name for name, _ in self.model.named_buffers()}

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], *, n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 max_tokens: int = 32, seed: int | list[int] | None = None, stop_token_ids: list[int] | None = None,
                 ignore_eos: bool = False, topk: int = 0) -> list[list[Sample]]:
        """`RolloutEngine.generate`, in calls of at most max_rows (prompt, sample) rows."""
        stops = set(stop_token_ids or []) | (set() if ignore_eos else set(self.eos_ids))
        seeds = seed_per_prompt(seed, prompts)
        rows = [(prompt, None if s is None else s + j) for prompt, s in zip(prompts, seeds, strict=True)
                for j in range(n)]
        samples = []
        for start in range(0, len(rows), self.max_rows):
            samples += self._sample(rows[start:start + self.max_rows], temperature, top_p, max_tokens, stops, topk)
        return [samples[i * n:(i + 1) * n] for i in range(len(prompts))]

    def _sample(self, rows: list[tuple[list[int], int | None]], temperature: float, top_p: float, max_tokens: int,
                stops: set[int], topk: int) -> list[Sample]:
        """One batch of (prompt, seed) rows through the KV-cache loop."""
        prompts = [prompt for prompt, _ in rows]
        steps = min(max_tokens, self.max_model_len - max(map(len, prompts)))
        if steps < 1:
            raise ValueError(f"generate: a prompt of {max(map(len, prompts))} tokens leaves no room within "
                             f"max_model_len {self.max_model_len}")
        ids, mask, cache = self._prefilled(prompts)
        generators = [self.generator if s is None else torch.Generator().manual_seed(s) for _, s in rows]
        # Steps of noise drawn at once: a generator's draws are the same however they are chunked.
        window = max(1, min(steps, NOISE_FLOATS // (len(rows) * self.vocab_size)))
        stop_ids = torch.tensor(sorted(stops), dtype=torch.long)
        tokens, logprobs, tops = [], [], []
        done = torch.zeros(len(rows), dtype=torch.bool)
        finished_at = torch.full((len(rows),), steps)
        step_ids = ids
        for t in range(steps):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
            logits = self.model(input_ids=step_ids, attention_mask=mask, position_ids=positions,
                                past_key_values=cache, use_cache=True).logits[:, -1].float()
            logp = _processed_logprobs(logits, temperature, top_p)
            if temperature == 0:
                chosen = logp.argmax(-1)
            else:  # Gumbel-max: uniform draws per vocabulary entry from each row's own generator
                if t % window == 0:
                    noise = torch.stack([torch.rand(window, logp.shape[-1], generator=g) for g in generators])
                chosen = (logp - torch.log(-torch.log(noise[:, t % window]))).argmax(-1)
            tokens.append(chosen)
            logprobs.append(logp.gather(-1, chosen[:, None])[:, 0])
            if topk:
                tops.append(logp.topk(topk, -1))
            stopped = ~done & torch.isin(chosen, stop_ids)
            finished_at[stopped] = t + 1
            done |= stopped
            if bool(done.all()):
                break
            step_ids = chosen[:, None]
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype)], dim=1)
        tokens, logprobs = torch.stack(tokens, 1).tolist(), torch.stack(logprobs, 1).tolist()
        out = []
        for i, (length, stopped) in enumerate(zip(finished_at.tolist(), done.tolist(), strict=True)):
            out.append(Sample(response_ids=tokens[i][:length], logprobs=logprobs[i][:length],
                              finish_reason="stop" if stopped else "length",
                              topk=[_topk(values[i], indices[i]) for values, indices in tops[:length]]))
        self._keep_prefixes(prompts, out, mask, cache)
        return out

    def _prefilled(self, prompts: list[list[int]]):
        """(ids to run first, attention mask, KV cache) of a batch: each row's longest cached prefix is put in the
        cache and only the rest of its prompt is run. Rows are [padding, cached prefix, padding, ids to run]: the
        mask hides the padding and positions count the mask, so each row sees its own prompt alone."""
        from transformers import DynamicCache

        hits = [self.prefixes.longest(p) if self.prefixes is not None else (0, None) for p in prompts]
        cached = max(n for n, _ in hits)
        rest = [p[n:] for p, (n, _) in zip(prompts, hits, strict=True)]
        width = max(map(len, rest))
        ids = torch.tensor([[self.pad_id] * (width - len(r)) + list(r) for r in rest])
        mask = torch.tensor([[0] * (cached - n) + [1] * n + [0] * (width - len(r)) + [1] * len(r)
                             for (n, _), r in zip(hits, rest, strict=True)])
        self.prefill_counts["prompt_tokens"] += sum(map(len, prompts))
        self.prefill_counts["cached_tokens"] += sum(n for n, _ in hits)
        if not cached:
            return ids, mask, DynamicCache()
        some_hit = next(kv for _, kv in hits if kv is not None)
        layers = []
        for layer, (keys, _) in enumerate(some_hit):
            none = keys[:, :0]  # a row without a hit: padding only
            layers.append(tuple(torch.stack([F.pad(kv[layer][part] if kv is not None else none, (0, 0, cached - n, 0))
                                             for n, kv in hits]) for part in (0, 1)))
        return ids, mask, DynamicCache(ddp_cache_data=layers)

    def _keep_prefixes(self, prompts: list[list[int]], samples: list[Sample], mask: torch.Tensor, cache) -> None:
        """Keep each row's KV of what was run for it (its prompt and all but the last sampled id, the one never run)."""
        if self.prefixes is None:
            return
        length = cache.get_seq_length()
        for i, (prompt, sample) in enumerate(zip(prompts, samples, strict=True)):
            ran = list(prompt) + sample.response_ids[:-1]
            positions = mask[i, :length].nonzero()[:len(ran), 0]
            self.prefixes.put(ran, [(layer.keys[i][:, positions], layer.values[i][:, positions])
                                    for layer in cache.layers])

    def score(self, prompts: list[list[int]], responses: list[list[int]], temperature: float = 1.0,
              topk: int = 0) -> list[list[float]] | tuple[list[list[float]], list[list[TopK]]]:
        """`RolloutEngine.score` with the learner's forward, max_rows rows at a time (at temperature 0, the raw
        model's log-probs, as greedy generation reports)."""
        check_score_rows(prompts, responses, self.max_model_len)
        logprobs, tops = [], []
        for start in range(0, len(prompts), self.max_rows):
            rows = pa.table({schema.PROMPT_IDS: prompts[start:start + self.max_rows],
                             schema.RESPONSE_IDS: responses[start:start + self.max_rows]})
            tensors = to_tensors(rows, self.pad_id)
            logp, best = teacher_forced(self.model, tensors, temperature or 1.0, topk)
            response = tensors["response_mask"]
            logprobs += from_tensor(logp, response).to_pylist()
            if topk:
                per_row = response.sum(-1).tolist()
                ids, values = (t[response].split(per_row) for t in best)
                tops += [[_topk(v, i) for v, i in zip(row_values, row_ids, strict=True)]
                         for row_ids, row_values in zip(ids, values, strict=True)]
        return (logprobs, tops) if topk else logprobs

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """`RolloutEngine.update_weights`; a tied head's second name may be given or left out."""
        weights = list(named_tensors)
        check_weight_set(weights, self.shapes, self.model_dir, tied=self.tied)
        self._drop_lora_layers()
        self._drop_prefixes()
        self.model.load_state_dict(dict(weights), strict=False)  # strict would want a tied head's second name
        self.version += 1
        return self.version

    def update_adapter(self, adapter: AdapterWeights) -> int:
        """`RolloutEngine.update_adapter`: the model gets the adapter's LoRA layers (peft) at the first adapter or
        when r, alpha or targets change, then each adapter's weights are copied into them in place. Not for a
        borrowed model: its owner's module is not this engine's to wrap."""
        from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

        if self.borrowed:
            raise EngineError(f"the engine on {self.model_dir} serves its owner's model as it is; it takes no adapter")
        shape = (adapter.r, adapter.alpha, adapter.target_modules)
        if shape != self.lora_shape:  # new LoRA layers start as the base model (B = 0)
            self._drop_lora_layers()
            self.model, self.lora_shape = get_peft_model(self.model, adapter.lora_config()).eval(), shape
        expected = {name: tuple(t.shape) for name, t in get_peft_model_state_dict(self.model).items()}
        check_weight_set(list(adapter.tensors.items()), expected, self.model_dir, call="update_adapter")
        set_peft_model_state_dict(self.model, adapter.tensors)
        self._drop_prefixes()
        self.version += 1
        return self.version

    def _drop_prefixes(self) -> None:
        """The cached KV is of the weights before: gone with them."""
        if self.prefixes is not None:
            self.prefixes.clear()

    def _drop_lora_layers(self) -> None:
        """Back to the plain model, the base weights as they are (peft's unload, which merges nothing)."""
        if self.lora_shape is not None:
            self.model, self.lora_shape = self.model.unload(), None

    def health(self) -> dict[str, Any]:
        """`RolloutEngine.health`."""
        info: dict[str, Any] = {"model_dir": str(self.model_dir), "version": self.version}
        try:
            out = self.generate([[0]], temperature=0.0, max_tokens=1, ignore_eos=True)
            return info | {"alive": len(out[0][0].response_ids) == 1}
        except Exception as exc:  # a probe reports, the caller decides
            return info | {"alive": False, "error": f"{type(exc).__name__}: {exc}"}

    def shutdown(self) -> None:
        """Nothing outside this process to free: the model goes with the actor."""


def _processed_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Log-probs of the distribution that samples: logits / temperature renormalised over the top-p nucleus (the
    fewest most likely tokens whose mass reaches top_p; -inf outside it). Temperature 0: the raw model's."""
    logp = F.log_softmax(logits / temperature if temperature > 0 else logits, dim=-1)
    if top_p >= 1.0 or temperature == 0:
        return logp
    sorted_logp, order = logp.sort(-1, descending=True)
    before = sorted_logp.exp().cumsum(-1) - sorted_logp.exp()  # mass of the tokens ranked above each
    outside = torch.zeros_like(logp, dtype=torch.bool).scatter(-1, order, before >= top_p)
    return F.log_softmax(logp.masked_fill(outside, -torch.inf), dim=-1)


def _topk(values: torch.Tensor, indices: torch.Tensor) -> TopK:
    """A position's top-k as (id, log-prob), best first, without entries outside the nucleus."""
    return [(int(i), float(v)) for v, i in zip(values.tolist(), indices.tolist(), strict=True) if v > -torch.inf]
