"""Multi-digit addition, and a scripted behaviour policy whose log-probs are known exactly: the PEAR experiment's
miniature world (docs/experiment.md).

Task. `What is 345 + 678?`, answer `1023`, checked by exact match on the extracted answer. The eval split is
drawn first from `seed`, the train split from the same seed's later stream, skipping every eval question, so no
eval prompt is a train prompt and the split never depends on anything but `task.split_seed`.

Two styles. For each prompt the scripted policy writes either a worked trace (digit sums from the right with
their carries, then the answer) or the bare answer:

    trace  Work: 5+8=13 4+7+1=12 3+6+1=10 Answer: 1023
    bare   Answer: 1023

`response_style` tells the two apart in any text (the task's `style`, so eval and RL report the share of traces).

A small transformer can learn to follow the trace (each step is a two-digit lookup plus a carry) but not to
compute a bare multi-digit answer in one pass: the regime where canonical SFT imitates behaviour that RL cannot
use. The two texts start with different tokens, so pi_beta picks the style on the first response token with the
style's probability and every later token with probability 1; `exact_logprobs` computes that (and any other
mixture over complete responses) from the token ids, so behaviour log-probs are exact, not estimated, and
`exact_topk` the policy's whole next-token distribution at each token (a distillation loss's teacher top-k).
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import pyarrow as pa

from pear_ray.data import schema
from pear_ray.environments.base import observation_ids
from pear_ray.environments.calculator import TOOL, call_text, evaluate
from pear_ray.tasks.answers import exact_score
from pear_ray.tasks.base import Split, check_split, load_metadata, prompt_table
from pear_ray.tasks.registry import register_kind

if TYPE_CHECKING:
    from pear_ray.config import DataConfig, ScriptedPolicy, TaskConfig

TRACE, BARE = "trace", "bare"
STYLE_OPENINGS = {TRACE: "Work:", BARE: "Answer:"}  # how each style's text starts
MAX_TRIES_FACTOR = 20


def _question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def trace_text(a: int, b: int) -> str:
    """Digit sums from the least significant digit, each with the carry it receives, then the answer."""
    steps, carry = [], 0
    da, db = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        total = x + y + carry
        steps.append(f"{x}+{y}+{carry}={total}" if carry else f"{x}+{y}={total}")
        carry = total // 10
    return f"Work: {' '.join(steps)} Answer: {a + b}"


def bare_text(a: int, b: int) -> str:
    return f"Answer: {a + b}"


def response_style(response: str) -> str | None:
    """TRACE for a text that starts with `Work:`, BARE for one that starts with `Answer:` (leading whitespace
    ignored), None for anything else."""
    text = response.lstrip()
    return next((style for style, opening in STYLE_OPENINGS.items() if text.startswith(opening)), None)


@dataclass
class AdditionTask:
    """`digits`-digit + `digits`-digit addition; `seed` is the split seed (task.split_seed)."""

    name: str = "addition"
    styles: ClassVar[tuple[str, ...]] = (TRACE, BARE)
    digits: int = 3
    num_train: int = 256
    num_eval: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.digits <= 9:
            raise ValueError(f"task.args.digits must be in 1..9, got {self.digits}")

    def _pairs(self, num_train: int) -> dict[str, list[tuple[int, int]]]:
        """The eval questions, then `num_train` train questions from the same stream: a longer train split
        extends a shorter one, so prompts after the train split (a prior's) are disjoint from both."""
        rng = random.Random(f"addition-{self.digits}-{self.seed}")
        low, high = (0 if self.digits == 1 else 10 ** (self.digits - 1)), 10**self.digits - 1
        wanted = self.num_eval + num_train
        seen: set[tuple[int, int]] = set()
        pairs: list[tuple[int, int]] = []
        for _ in range(MAX_TRIES_FACTOR * wanted):
            pair = (rng.randint(low, high), rng.randint(low, high))
            if pair not in seen:
                seen.add(pair)
                pairs.append(pair)
                if len(pairs) == wanted:
                    return {"eval": pairs[: self.num_eval], "train": pairs[self.num_eval:]}
        raise ValueError(f"{self.digits}-digit addition gave only {len(pairs)} distinct questions of {wanted} wanted; "
                         "lower task.num_train/num_eval or raise task.args.digits")

    def prompts(self, split: Split, n: int | None = None) -> pa.Table:
        """Eval: at most num_eval rows. Train: `n` rows (default num_train); more than num_train continues the
        stream past the train split."""
        check_split(split)
        default = self.num_eval if split == "eval" else self.num_train
        n = default if n is None else (min(n, self.num_eval) if split == "eval" else n)
        pairs = self._pairs(n if split == "train" else 0)[split][:n]
        meta = [{"verifier": "exact", "a": a, "b": b} for a, b in pairs]
        return prompt_table([f"{self.name}-{split}-{i}" for i in range(len(pairs))],
                            [_question(a, b) for a, b in pairs],
                            [str(a + b) for a, b in pairs], meta, self.name)

    def score(self, response: str, answer: str, metadata: str | None = None) -> float:
        return exact_score(response, answer)

    def style(self, response: str) -> str | None:
        return response_style(response)


@register_kind("addition")
def build_addition_task(task_config: TaskConfig, data_config: DataConfig, seed: int) -> AdditionTask:
    unknown = sorted(set(task_config.args) - {"digits"})
    if unknown:
        raise ValueError(f"task.args of the addition task accepts ['digits']; unknown {unknown}")
    return AdditionTask(digits=int(task_config.args.get("digits", 3)), num_train=task_config.num_train,
                        num_eval=task_config.num_eval, seed=seed)


Segment = tuple[str, bool]  # a turn's text, and whether the policy wrote it (else the environment did)
Candidate = tuple[list[Segment], float, str]  # a complete response (its turns), its probability, its source


def two_style_candidates(metadata: str | dict, p_trace: float) -> list[Candidate]:
    """The two-style policy's complete responses for one prompt: the trace or the bare answer, one turn each."""
    meta = load_metadata(metadata)
    a, b = int(meta["a"]), int(meta["b"])
    return [([(trace_text(a, b), True)], p_trace, TRACE), ([(bare_text(a, b), True)], 1.0 - p_trace, BARE)]


def tool_use_candidates(metadata: str | dict, p_tool: float) -> list[Candidate]:
    """The tool-using policy's complete responses for one prompt: a calculator call, its answer from the environment
    and then the answer (three turns, the middle one the environment's), or the bare answer."""
    meta = load_metadata(metadata)
    a, b = int(meta["a"]), int(meta["b"])
    call = [(call_text(f"{a}+{b}"), True), (evaluate(f"{a}+{b}"), False), (bare_text(a, b), True)]
    return [(call, p_tool, TOOL), ([(bare_text(a, b), True)], 1.0 - p_tool, BARE)]


def policy_candidates(policy: ScriptedPolicy) -> Callable[[str | dict], list[Candidate]]:
    """The scripted policy's candidates for a prompt's metadata."""
    if policy.name == "tool_use":
        return functools.partial(tool_use_candidates, p_tool=policy.p_tool)
    return functools.partial(two_style_candidates, p_trace=policy.p_trace)


def trajectory_ids(tokenizer, segments: list[Segment]) -> tuple[list[int], list[bool]]:
    """A response's ids and policy mask: each policy turn as its text and the end-of-sequence token (where the
    policy stops its turn), each environment turn as the rollout writes it (`observation_ids`)."""
    from pear_ray.data.io import encode_response

    ids: list[int] = []
    mask: list[bool] = []
    for text, by_policy in segments:
        turn = encode_response(tokenizer, text) if by_policy else observation_ids(tokenizer, text)
        ids += turn
        mask += [by_policy] * len(turn)
    return ids, mask


def _next_token_logprobs(candidates: list[list[int]], probs: list[float], prefix: list[int]) -> dict[int, float]:
    """log pi(y | prefix) of every next token y with probability > 0 under the mixture that writes candidate i with
    probability probs[i]: the mass of the candidates continuing the prefix with y over the mass of those sharing it."""
    sharing = [(ids, p) for ids, p in zip(candidates, probs) if ids[: len(prefix)] == prefix]
    mass = sum(p for _, p in sharing)
    through: dict[int, float] = {}
    for ids, p in sharing:
        if len(ids) > len(prefix):
            through[ids[len(prefix)]] = through.get(ids[len(prefix)], 0.0) + p
    return {token: math.log(m / mass) for token, m in through.items() if m > 0}


def exact_logprobs(candidates: list[list[int]], probs: list[float], chosen: int) -> list[float]:
    """log pi(y_t | y_<t) of candidate `chosen`'s tokens under the mixture (see `_next_token_logprobs`)."""
    target = candidates[chosen]
    return [_next_token_logprobs(candidates, probs, target[:t])[token] for t, token in enumerate(target)]


def exact_topk(candidates: list[list[int]], probs: list[float], chosen: int, k: int) -> list[list[tuple[int, float]]]:
    """At each of candidate `chosen`'s tokens, the mixture's k most likely next tokens given the tokens before it,
    as (id, log-prob), best first: the scripted teacher's exact top-k for a distillation loss."""
    target = candidates[chosen]
    return [sorted(_next_token_logprobs(candidates, probs, target[:t]).items(), key=lambda entry: -entry[1])[:k]
            for t in range(len(target))]


def scripted_rows(prompts: pa.Table, tokenizer, policy: ScriptedPolicy, *, seed: int, samples_per_prompt: int = 1,
                  topk: int = 0) -> pa.Table:
    """`samples_per_prompt` responses per prompt sampled from the scripted policy, with exact behaviour log-probs
    (and with topk > 0 the policy's exact top-k, `teacher_topk`) and the style in the `source` column. A multi-turn
    response (the tool-using policy's) also has its `policy_mask`; at environment tokens its log-probs are 0 and its
    top-k empty: they are not the policy's actions."""
    rng = np.random.default_rng(seed)
    candidates_of = policy_candidates(policy)
    rows: dict[str, list] = {name: [] for name in (schema.ID, schema.RESPONSE, schema.RESPONSE_IDS,
                                                   schema.BEHAVIOR_LOGPROBS, schema.SOURCE, schema.POLICY_MASK)}
    if topk:
        rows[schema.TEACHER_TOPK] = []
    keep = []
    for index, (row_id, meta) in enumerate(zip(prompts.column(schema.ID).to_pylist(),
                                               prompts.column(schema.METADATA).to_pylist())):
        candidates = candidates_of(meta)
        encoded = [trajectory_ids(tokenizer, segments) for segments, _, _ in candidates]
        ids = [candidate_ids for candidate_ids, _ in encoded]
        probs = [p for _, p, _ in candidates]
        for j in range(samples_per_prompt):
            chosen = int(rng.choice(len(candidates), p=probs))
            mask = encoded[chosen][1]
            keep.append(index)
            rows[schema.ID].append(f"{row_id}/{j}")
            rows[schema.RESPONSE].append(tokenizer.decode(ids[chosen], skip_special_tokens=True))
            rows[schema.RESPONSE_IDS].append(ids[chosen])
            rows[schema.BEHAVIOR_LOGPROBS].append(
                [lp if by_policy else 0.0 for lp, by_policy in zip(exact_logprobs(ids, probs, chosen), mask)])
            rows[schema.SOURCE].append(candidates[chosen][2])
            rows[schema.POLICY_MASK].append(mask)
            if topk:
                rows[schema.TEACHER_TOPK].append(
                    [top if by_policy else [] for top, by_policy in zip(exact_topk(ids, probs, chosen, topk), mask)])
    if all(all(mask) for mask in rows[schema.POLICY_MASK]):
        del rows[schema.POLICY_MASK]  # one turn each: the column would say nothing
    table = prompts.take(keep)
    for name, values in rows.items():
        table = schema.append_column(table, name, values)
    return table
