"""The rollout service's second backend: generation and teacher-forced scoring with the model's own transformers
forward, in the actor's process. For small models on CPU, where vLLM's per-step scheduling costs more than the
model itself (a 2-layer model: vLLM ~6 ms a decode step, this loop ~2 ms); vLLM is the backend for everything else.

Same interface and meaning as `VllmEngine`: token ids in, `Sample`s out, each sampled token's log-prob under the
distribution that sampled it (logits / temperature over the top-p nucleus), sample j of a prompt drawn from its own
generator seeded `seed + j` (so a prompt's samples do not depend on what else is in the call), stop at an EOS or stop
token (kept in the response, finish reason "stop") or after max_tokens ("length"), weights reloaded in place.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pear_ray.engines.vllm_engine import EngineError, Sample, TopK, check_model_dir

NOISE_FLOATS = 2**22  # sampling noise drawn ahead per call, at most (16 MiB)


class TransformersEngine:
    """A transformers causal LM with a KV-cache sampling loop; rows of a call are padded on the left."""

    def __init__(self, model_dir: str | Path, *, dtype: str = "float32", seed: int = 0, max_rows: int = 256):
        from transformers import AutoModelForCausalLM, GenerationConfig

        self.model_dir, self.version, self.max_rows = check_model_dir(model_dir), 0, max_rows
        try:
            self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=getattr(torch, dtype)).eval()
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
        self.aliases = set(state) - {name for name, _ in self.model.named_parameters()} - {
            name for name, _ in self.model.named_buffers()}

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], *, n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 max_tokens: int = 32, seed: int | list[int] | None = None, stop_token_ids: list[int] | None = None,
                 ignore_eos: bool = False, topk: int = 0) -> list[list[Sample]]:
        """n samples per prompt (see the module docstring); at temperature 0, greedy with the raw model's
        log-probs."""
        seeds = seed if isinstance(seed, list) else [seed] * len(prompts)
        if len(seeds) != len(prompts):
            raise ValueError(f"generate: {len(seeds)} seeds for {len(prompts)} prompts")
        stops = set(stop_token_ids or []) | (set() if ignore_eos else set(self.eos_ids))
        rows = [(prompt, None if s is None else s + j) for prompt, s in zip(prompts, seeds, strict=True)
                for j in range(n)]
        samples = []
        for start in range(0, len(rows), self.max_rows):
            samples += self._sample(rows[start:start + self.max_rows], temperature, top_p, max_tokens, stops, topk)
        return [samples[i * n:(i + 1) * n] for i in range(len(prompts))]

    def _sample(self, rows: list[tuple[list[int], int | None]], temperature: float, top_p: float, max_tokens: int,
                stops: set[int], topk: int) -> list[Sample]:
        """One batch of (prompt, seed) rows through the KV-cache loop."""
        from transformers import DynamicCache

        prompts = [prompt for prompt, _ in rows]
        width = max(map(len, prompts))
        steps = min(max_tokens, self.max_model_len - width)
        if steps < 1:
            raise ValueError(f"generate: a prompt of {width} tokens leaves no room within max_model_len "
                             f"{self.max_model_len}")
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + list(p) for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        generators = [self.generator if s is None else torch.Generator().manual_seed(s) for _, s in rows]
        # Steps of noise drawn at once: a generator's draws are the same however they are chunked.
        window = max(1, min(steps, NOISE_FLOATS // (len(rows) * self.vocab_size)))
        stop_ids = torch.tensor(sorted(stops), dtype=torch.long)
        cache, tokens, logprobs, tops = DynamicCache(), [], [], []
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
        return out

    @torch.no_grad()
    def score(self, prompts: list[list[int]], responses: list[list[int]], temperature: float = 1.0,
              topk: int = 0) -> list[list[float]] | tuple[list[list[float]], list[list[TopK]]]:
        """Teacher-forced log p(response_t | prompt, response_<t) of logits / temperature; with topk > 0 also each
        response token's top-k, as `VllmEngine.score`."""
        if len(prompts) != len(responses):
            raise ValueError(f"score: {len(prompts)} prompts but {len(responses)} responses")
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            if not p or not r:
                raise ValueError(f"score: row {i} has an empty {'prompt' if not p else 'response'}")
            if len(p) + len(r) > self.max_model_len:
                raise ValueError(f"score: row {i} has {len(p)} + {len(r)} tokens; at most max_model_len = "
                                 f"{self.max_model_len} can be scored")
        logprobs, tops = [], []
        for start in range(0, len(prompts), self.max_rows):
            part = list(zip(prompts[start:start + self.max_rows], responses[start:start + self.max_rows],
                            strict=True))
            width = max(len(p) + len(r) for p, r in part)
            ids = torch.tensor([list(p) + list(r) + [self.pad_id] * (width - len(p) - len(r)) for p, r in part])
            mask = torch.tensor([[1] * (len(p) + len(r)) + [0] * (width - len(p) - len(r)) for p, r in part])
            logp = _processed_logprobs(self.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(),
                                       temperature if temperature > 0 else 1.0, 1.0)
            picked = logp.gather(-1, ids[:, 1:, None])[..., 0]
            best = logp.topk(topk, -1) if topk else None
            for row, (p, r) in enumerate(part):
                span = slice(len(p) - 1, len(p) + len(r) - 1)  # the positions that predict the response
                logprobs.append(picked[row, span].tolist())
                if topk:
                    tops.append([_topk(v, i) for v, i in zip(best.values[row, span], best.indices[row, span],
                                                             strict=True)])
        return (logprobs, tops) if topk else logprobs

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load a learner's weights (Hugging Face names) in place; refuses anything but the exact set, before
        loading any."""
        weights = dict(named_tensors)
        got = {name: tuple(t.shape) for name, t in weights.items()}
        unknown, missing = sorted(set(got) - set(self.shapes)), sorted(set(self.shapes) - set(got) - self.aliases)
        wrong = [f"{n} {got[n]} != {self.shapes[n]}" for n in sorted(set(got) & set(self.shapes))
                 if got[n] != self.shapes[n]]
        if unknown or missing or wrong:
            raise ValueError(f"update_weights for {self.model_dir} needs exactly the model's tensors: unknown "
                             f"{unknown[:5]}, missing {missing[:5]}, wrong shapes {wrong[:5]} (nothing was loaded)")
        self.model.load_state_dict(weights, strict=False)  # strict would want a tied head's second name
        self.version += 1
        return self.version

    def health(self) -> dict[str, Any]:
        """Model folder, weight version and a one-token greedy generation as a liveness check; never raises."""
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
