"""Learner micro-batches by token budget, packed without padding (engines/packing.py): the pure pieces, the packed
forward against each row alone, and packed DeepSpeed steps against padded ones (real Ray, real DeepSpeed on CPU).

The step comparisons run the same objectives, one step each, on groups that start from the same weights: one rank
padded (the reference, today's path), and packed under a budget that cuts each rank's rows into several
micro-batches, at one rank and at two (where rank 1 has fewer micro-batches than rank 0, so it runs fillers). The
optimizer is AdamW with an eps far above every gradient, which makes an update (lr / eps) x the gradient: equal
updates mean equal gradients.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import ray
import torch
from support.learner import as_multi_turn

from pear_ray.actors.learner import LearnerGroup
from pear_ray.config import LearnerResources
from pear_ray.data import schema
from pear_ray.data.tensors import to_tensors
from pear_ray.engines.hf_scorer import forward
from pear_ray.engines.packing import micro_batch_bounds, pack, packed_positions, unpack
from pear_ray.objectives import Grpo, PearSft

# Rows of 16..512 tokens. Over two ranks, rank 0's four rows make two micro-batches of <= BUDGET tokens and
# rank 1's one, so rank 1 runs a filler; at one rank the eight rows make three.
LENGTHS = [512, 16, 40, 300, 100, 64, 200, 16]
BUDGET = 600
SGD_LIKE = dict(lr=100.0, eps=1e4, grad_clip=0.0, weight_decay=0.0, seed=0)  # update = 0.01 x gradient
OBJECTIVES = {
    "sft": PearSft(level="none"),
    "pear-token-by-weights": PearSft(level="token", normalize="weights"),  # its size reads the model
    "pear-block": PearSft(level="block", block_size=8),
    "pear-sequence": PearSft(level="sequence"),
    # on-policy: logp_old pre-pass, two updates, KL and TIS columns, a per-row aggregation
    "grpo": Grpo(kl_coef=0.1, tis_cap=1.5, loss_aggregation="sequence-mean", epochs_per_batch=2),
}


def make_batch(lengths: list[int], seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    rows = []
    for length in lengths:
        prompt_len = int(rng.integers(2, 8))
        n = length - prompt_len
        rows.append({
            schema.PROMPT_IDS: rng.integers(3, 380, prompt_len).tolist(),
            schema.RESPONSE_IDS: rng.integers(3, 380, n).tolist(),
            schema.BEHAVIOR_LOGPROBS: rng.uniform(-7.5, -4.5, n).tolist(),
            schema.ROLLOUT_LOGPROBS: rng.uniform(-6.5, -5.5, n).tolist(),
            schema.REF_LOGPROBS: rng.uniform(-6.5, -5.5, n).tolist(),
            schema.ADVANTAGE: float(rng.normal()),
        })
    return schema.validate(pa.Table.from_pylist(rows), vocab_size=384)


BATCH = as_multi_turn(make_batch(LENGTHS, seed=0), seed=0)  # environment tokens in every row: context, not loss


def test_micro_batches_cut_rows_in_order_by_token_count():
    assert micro_batch_bounds(np.array([5, 3, 9, 20, 2, 2]), 10) == [(0, 2), (2, 3), (3, 4), (4, 6)]
    assert micro_batch_bounds(np.array([4, 4]), 8) == [(0, 2)]
    assert micro_batch_bounds(np.array([], dtype=np.int64), 8) == []
    assert [len(micro_batch_bounds(np.array(part), BUDGET)) for part in (LENGTHS[:4], LENGTHS[4:], LENGTHS)] \
        == [2, 1, 3]


def test_pack_keeps_the_real_tokens_row_after_row():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert pack(ids, mask).tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert packed_positions(mask).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert torch.equal(unpack(pack(ids, mask), mask), torch.where(mask, ids, 0))
    values = torch.randn(3, 4, 2, requires_grad=True)
    unpack(pack(values, mask), mask).sum().backward()  # differentiable both ways: the gradient reaches the cells
    assert torch.equal(values.grad, mask[..., None].float().expand(3, 4, 2))


def test_packed_forward_equals_each_row_alone(tiny_model_dir):
    """One packed row of sequences of 16..512 tokens: every token's log-prob, and candidate log-probs, are those
    of its sequence scored alone; attention never crosses sequences."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    tensors = to_tensors(BATCH, pad_id=0)
    mask = tensors["attention_mask"]
    candidates = torch.randint(0, 384, (*mask.shape, 3))
    with torch.no_grad():
        logp, logprobs_at = forward(model, tensors, packed=True)
        got = logprobs_at(candidates)
        for row, length in enumerate(LENGTHS):
            alone, alone_at = forward(model, {key: tensors[key][row:row + 1, :length] for key in tensors})
            assert float((logp[row, :length] - alone[0]).abs().max()) < 1e-5
            assert float((got[row, :length] - alone_at(candidates[row:row + 1, :length])[0]).abs().max()) < 1e-5
    assert bool((logp[~mask] == 0).all()) and bool((got[~mask] == 0).all())


def weights_of(group: LearnerGroup) -> dict[str, torch.Tensor]:
    return ray.get(group.weights_ref())


def run_objectives(group: LearnerGroup) -> list[tuple[dict, dict]]:
    """(stats, weights after) for one step of each objective, in order."""
    return [(group.step(ray.put(BATCH), objective), weights_of(group)) for objective in OBJECTIVES.values()]


@pytest.fixture(scope="module")
def trajectories(ray_cluster, tiny_model_dir):
    """trajectory(ranks, zero_stage, budget) -> (initial weights, run_objectives), each group run once."""
    started: dict[tuple, tuple] = {}
    groups = []

    def get(ranks: int, zero_stage: int, budget: int | None):
        key = (ranks, zero_stage, budget)
        if key not in started:
            resources = LearnerResources(num_ranks=ranks, zero_stage=zero_stage, num_cpus=0.25,
                                         max_tokens_per_micro_batch=budget)
            group = LearnerGroup(tiny_model_dir, resources, **SGD_LIKE)
            groups.append(group)
            started[key] = (weights_of(group), run_objectives(group), group)
        return started[key]

    yield get
    for group in groups:
        group.shutdown()


def max_abs_diff(a: dict, b: dict) -> float:
    return max(float((a[name] - b[name]).abs().max()) for name in a)


@pytest.mark.parametrize("ranks, zero_stage", [(1, 0), (2, 2), pytest.param(2, 3, marks=pytest.mark.slow)])
def test_packed_steps_equal_padded_steps(trajectories, ranks, zero_stage):
    """Each objective's packed step (micro-batches, gradients accumulated, fillers at two ranks) gives the padded
    step's loss, statistics, gradient norm and update, to 1e-5."""
    initial, padded, _ = trajectories(1, 0, None)
    _, packed, _ = trajectories(ranks, zero_stage, BUDGET)
    before = initial
    for name, (want, want_weights), (got, got_weights) in zip(OBJECTIVES, padded, packed):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (name, key)
        update = max_abs_diff(want_weights, before)
        assert update > 1e-4, name  # the step trained
        # 1e-7: the rounding of fp32 weights near 1
        assert max_abs_diff(got_weights, want_weights) <= 1e-5 * update + 1e-7, name
        before = want_weights


def test_packed_logprobs_equal_padded(trajectories):
    """logprobs under the budget, two ranks: the 8-row batch (rank 1 has fewer micro-batches) and a 1-row batch
    (rank 1 has none and runs a filler)."""
    _, _, padded = trajectories(1, 0, None)
    _, _, packed = trajectories(2, 2, BUDGET)
    for batch in (BATCH, BATCH.slice(0, 1)):
        want = ray.get(padded.logprobs(ray.put(batch))).to_pylist()
        got = ray.get(packed.logprobs(ray.put(batch))).to_pylist()
        assert [len(row) for row in got] == [len(row) for row in want]
        assert np.abs(np.concatenate(got) - np.concatenate(want)).max() < 1e-5
