"""What a rollout/scoring engine is, whichever backend runs it (`resources.rollout.engine.backend`): the interface the
rollout actor calls (`RolloutEngine`), the types it speaks (`Sample`, `TopK`, `EngineError`), and the checks every
engine makes before it starts (`check_model_dir`) or reloads (`check_weight_set`).

No engine here: importing this loads neither vLLM nor a model, and sets no environment variable. The engines
(`vllm_engine.VllmEngine`, `transformers_engine.TransformersEngine`) import it; neither imports the other.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pear_ray.models import IncompleteModel, check_model_files

if TYPE_CHECKING:
    import torch

    from pear_ray.engines.adapters import AdapterWeights

TopK = list[tuple[int, float]]  # one position's top-k next tokens as (id, log-prob), best first


class EngineError(RuntimeError):
    """The engine could not start or serve; the message names the model folder."""


@dataclass
class Sample:
    response_ids: list[int]
    logprobs: list[float]  # log-prob of each sampled token under the distribution that sampled it (RolloutEngine)
    finish_reason: str  # "stop" (EOS / stop token) or "length"
    topk: list[TopK] = field(default_factory=list)  # with generate(topk=k > 0): one per response token


class RolloutEngine(Protocol):
    """One model in one process, token ids in and out; what `actors/rollout.RolloutWorker` calls.

    Log-probs are those of the distribution that samples (logits / temperature renormalised over the top-p nucleus;
    at temperature 0, greedy, the raw model's), not of the raw model, since PEAR's behaviour log-probs and RL's
    importance ratios are ratios against the sampler. Teacher-forced scores sample nothing: they are of logits /
    temperature. Either can also give each response token's top-k next tokens under that same distribution.
    """

    vocab_size: int
    max_model_len: int  # prompt + response tokens the engine can hold
    # generation's prompt tokens so far, and how many of them came from the prefix cache instead of a prefill:
    # {"prompt_tokens": n, "cached_tokens": m}
    prefill_counts: dict[str, int]

    def generate(self, prompts: list[list[int]], *, n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 max_tokens: int = 32, seed: int | list[int] | None = None, stop_token_ids: list[int] | None = None,
                 ignore_eos: bool = False, topk: int = 0) -> list[list[Sample]]:
        """n samples per prompt. `seed` is one seed for every prompt or one per prompt; sample j of a prompt is
        drawn with its seed + j, so a prompt's samples do not depend on what else is in the call and the same call
        returns the same samples. A sample stops at an EOS (unless ignore_eos) or stop token, kept in the response
        (finish reason "stop"), or after max_tokens ("length"). With topk > 0 each sample carries the sampling
        distribution's top-k at every response token."""
        ...

    def score(self, prompts: list[list[int]], responses: list[list[int]], temperature: float = 1.0,
              topk: int = 0) -> list[list[float]] | tuple[list[list[float]], list[list[TopK]]]:
        """Teacher-forced log p(response_t | prompt, response_<t) of logits / temperature for every response token;
        with topk > 0, (those, each response token's top-k as in `Sample.topk`). Empty rows are refused."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load new weights (Hugging Face names, e.g. a learner's state_dict items) in place and return the engine's
        new weight version; anything but the model's exact set is refused before loading any (`check_weight_set`).
        Full weights are the whole policy: an adapter taken before is dropped."""
        ...

    def update_adapter(self, adapter: AdapterWeights) -> int:
        """Serve base + this LoRA adapter from now on, replacing any adapter before it (the base weights are those of
        the folder or of the last `update_weights`), and return the engine's new weight version. Costs the adapter's
        bytes (`AdapterWeights.nbytes`), not the model's."""
        ...

    def health(self) -> dict[str, Any]:
        """{"model_dir", "version", "alive"} (and "error" when not alive) from a one-token generation; never raises."""
        ...

    def shutdown(self) -> None:
        """Free what the engine holds outside the Python object; it is unusable afterwards."""
        ...


def check_model_dir(model_dir: str | Path) -> Path:
    """Fail fast with a readable error instead of an engine's stack dump for a missing or incomplete model folder."""
    try:
        return check_model_files(Path(model_dir), f"model folder {model_dir}")
    except IncompleteModel as error:
        raise EngineError(str(error)) from None


def seed_per_prompt(seed: int | list[int] | None, prompts: list[list[int]]) -> list[int | None]:
    """`generate`'s seed argument as one seed per prompt."""
    seeds = seed if isinstance(seed, list) else [seed] * len(prompts)
    if len(seeds) != len(prompts):
        raise ValueError(f"generate: {len(seeds)} seeds for {len(prompts)} prompts")
    return seeds


def check_score_rows(prompts: list[list[int]], responses: list[list[int]], max_tokens: int) -> None:
    """Refuse a `score` call before any work, naming the row: an empty prompt or response (nothing predicts the first
    token of a row, nothing to score), or more than max_tokens prompt + response tokens."""
    if len(prompts) != len(responses):
        raise ValueError(f"score: {len(prompts)} prompts but {len(responses)} responses")
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        if not p or not r:
            raise ValueError(f"score: row {i} has an empty {'prompt' if not p else 'response'}")
        if len(p) + len(r) > max_tokens:
            raise ValueError(f"score: row {i} has {len(p)} + {len(r)} tokens; this engine scores at most {max_tokens}")


def check_weight_set(weights: list[tuple[str, torch.Tensor]], shapes: dict[str, tuple[int, ...]],
                     model_dir: str | Path, *, tied: Collection[str] = (), call: str = "update_weights") -> None:
    """Refuse anything but the exact tensors of `shapes` (name -> shape), each once, before an engine loads any: a
    partial or misnamed set would leave vLLM's parameters half unloaded, or keep some of the old weights in a
    transformers model without a word. `tied`: the second names of a tied head, one tensor under two names, which a
    learner's state_dict repeats and a checkpoint may leave out; they may be given or not (and if `shapes` knows
    them, with the right shape). `call`: the method refusing, for the message."""
    got = {name: tuple(t.shape) for name, t in weights}
    unknown = sorted(set(got) - set(shapes) - set(tied))
    missing = sorted(set(shapes) - set(got) - set(tied))
    wrong = [f"{n} {got[n]} != {shapes[n]}" for n in sorted(set(got) & set(shapes)) if got[n] != shapes[n]]
    if unknown or missing or wrong or len(got) != len(weights):
        raise ValueError(f"{call} for {model_dir} needs exactly its {len(shapes)} tensors: "
                         f"unknown {unknown[:5]}, missing {missing[:5]}, wrong shapes {wrong[:5]}, "
                         f"duplicates {len(weights) - len(got)} (nothing was loaded)")
