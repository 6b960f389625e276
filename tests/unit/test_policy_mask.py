"""Multi-turn rows: the environment's tokens are context. PEAR's sums, gamma's exponents and blocks count the
policy's tokens only, and no objective's loss, divisor or statistics read what sits at the environment's tokens."""

import math

import pyarrow as pa
import pytest
import torch

from pear_ray.data import schema
from pear_ray.data.tensors import to_tensors
from pear_ray.objectives import Grpo, ObjectiveInputs, OnPolicyDistill, PearSft, pear_weights

# One two-turn row: prompt [1], then the policy's p1, the environment's e1 e2 (a tool's answer), the policy's
# p2..p5. On the grid: column 0 the prompt, 1 p1, 2 e1, 3 e2, 4..7 p2..p5.
POLICY = [True, False, False, True, True, True, True]
# Policy tokens t = 1..5: lb, and lt = lb + raw d with raw d = [0.1, -0.5, 0.2, 1.0, 0.05], which the delta clip
# (-0.08, 0.3) makes d = [0.1, -0.08, 0.2, 0.3, 0.05]. Environment tokens hold 0.0, as the schema keeps them.
BEHAVIOR = [-1.0, 0.0, 0.0, -2.0, -1.5, -2.0, -0.5]
TARGET = [-0.9, 0.0, 0.0, -2.5, -1.3, -1.0, -0.45]
GAMMA, BLOCK = 0.5, 2


def two_turn_row() -> pa.Table:
    return schema.validate(pa.table({
        schema.PROMPT_IDS: [[1]], schema.RESPONSE_IDS: [[7, 30, 31, 8, 9, 10, 11]],
        schema.BEHAVIOR_LOGPROBS: [BEHAVIOR], schema.REF_LOGPROBS: [TARGET], schema.POLICY_MASK: [POLICY]}))


# T = 5 policy tokens, gamma = 0.5. Grid columns 1, 4, 5, 6, 7 are t = 1..5; the environment's 2, 3 get weight 0.
E = math.exp
HAND = {
    "none": [1.0] * 5,
    # sum of every d: 0.1 - 0.08 + 0.2 + 0.3 + 0.05 = 0.57
    "sequence": [E(0.57)] * 5,
    # (T - t) log gamma + the later policy tokens' d, straight across e1 e2:
    # t=1: 4 log 0.5 + (-0.08 + 0.2 + 0.3 + 0.05);  t=2: 3 log 0.5 + 0.55;  t=3: 2 log 0.5 + 0.35;
    # t=4: log 0.5 + 0.05;  t=5 (last): 0
    "token": [E(0.47) / 16, E(0.55) / 8, E(0.35) / 4, E(0.05) / 2, 1.0],
    # B = 2 over policy tokens: blocks {p1, p2}, {p3, p4}, {p5}, e = 2, 4, 5 (counting e1 e2 would pair p1 with e1)
    # t=1,2: (5 - 2) log 0.5 + d3 + d4 + d5 = 0.55;  t=3,4: (5 - 4) log 0.5 + d5 = 0.05;  t=5: 0
    "block": [E(0.55) / 8, E(0.55) / 8, E(0.05) / 2, E(0.05) / 2, 1.0],
}


@pytest.mark.parametrize("level", list(HAND))
def test_pear_weights_of_a_two_turn_row_by_hand(level):
    tensors = to_tensors(two_turn_row(), pad_id=0, columns=(schema.REF_LOGPROBS, schema.BEHAVIOR_LOGPROBS))
    weights = pear_weights(tensors[schema.REF_LOGPROBS], tensors[schema.BEHAVIOR_LOGPROBS], tensors["response_mask"],
                           level, gamma=GAMMA, block_size=BLOCK)
    expected = torch.zeros(1, 8, dtype=torch.float64)
    expected[0, [1, 4, 5, 6, 7]] = torch.tensor(HAND[level], dtype=torch.float64)
    torch.testing.assert_close(weights.double(), expected, rtol=1e-6, atol=1e-7)


def with_environment_tokens(seed: int, length: int = 30):
    """Random policy-only rows, and the same rows with environment tokens (random log-probs) inserted among their
    response tokens: (lt, lb, mask) of each, and the columns of the policy tokens in the second."""
    g = torch.Generator().manual_seed(seed)
    rows, T = 5, [length, 20, 13, 1, 7]
    lb = -torch.rand(rows, length, generator=g, dtype=torch.float64) * 3
    lt = lb + 0.1 + torch.randn(rows, length, generator=g, dtype=torch.float64) * 0.3
    mask = torch.arange(length)[None, :] < torch.tensor(T)[:, None]
    wide = 2 * length + 1  # room for the environment's tokens
    lt_env = torch.randn(rows, wide, generator=g, dtype=torch.float64) - 5  # garbage wherever the policy is not
    lb_env = torch.randn(rows, wide, generator=g, dtype=torch.float64) - 5
    mask_env = torch.zeros(rows, wide, dtype=torch.bool)
    columns = []
    for b in range(rows):
        # one prompt token, then runs of environment tokens of random length between the policy's
        cols = 1 + torch.arange(T[b]) + torch.randint(0, 3, (T[b],), generator=g).cumsum(0)
        lt_env[b, cols], lb_env[b, cols], mask_env[b, cols] = lt[b, :T[b]], lb[b, :T[b]], True
        columns.append(cols)
    return (lt, lb, mask), (lt_env, lb_env, mask_env), columns


@pytest.mark.parametrize("level", ["none", "sequence", "token", "block"])
@pytest.mark.parametrize(("gamma", "block_size"), [(0.9, 3), (1.0, 4)])
def test_environment_tokens_leave_the_weights_of_the_policy_only_sequence(level, gamma, block_size):
    (lt, lb, mask), (lt_env, lb_env, mask_env), columns = with_environment_tokens(seed=4)
    settings = dict(level=level, gamma=gamma, block_size=block_size, delta_clip=(-0.2, 0.3))
    alone = pear_weights(lt, lb, mask, **settings)
    among = pear_weights(lt_env, lb_env, mask_env, **settings)
    for b, cols in enumerate(columns):
        torch.testing.assert_close(among[b, cols], alone[b, :len(cols)], rtol=1e-12, atol=0.0)
    assert (among[~mask_env] == 0).all()


def multi_turn_inputs(seed: int, logp_at_env: float):
    """A batch of rows with environment tokens: ObjectiveInputs whose log-probs and columns hold values derived from
    `logp_at_env` wherever the policy did not sample (environment tokens, prompt and padding)."""
    g = torch.Generator().manual_seed(seed)
    rows, length = 4, 12
    positions = torch.zeros(rows, length, dtype=torch.bool)
    for b, (start, end) in enumerate([(1, 12), (2, 9), (1, 5), (3, 11)]):
        positions[b, start:end] = True
    mask = positions & (torch.rand(rows, length, generator=g) > 0.35)
    mask[:, 1:4] |= positions[:, 1:4]  # every row has a policy token

    def per_token(scale):
        values = -torch.rand(rows, length, generator=g) * scale
        return torch.where(mask, values, logp_at_env)

    logp_old = per_token(2.0)
    logp = (logp_old + torch.where(mask, 0.1 * torch.randn(rows, length, generator=g), 0.0)).requires_grad_()
    columns = {schema.BEHAVIOR_LOGPROBS: per_token(2.0), schema.REF_LOGPROBS: per_token(2.0),
               schema.ROLLOUT_LOGPROBS: per_token(2.0), schema.TEACHER_LOGPROBS: per_token(2.0),
               schema.ADVANTAGE: torch.tensor([1.0, -0.5, 2.0, -1.0])}
    return ObjectiveInputs(logp=logp, mask=mask, columns=columns, logp_old=logp_old), mask


TOKENS, ROWS, WEIGHTS = "tokens", "rows", "weights"  # what each objective's size counts
OBJECTIVES = [(PearSft(level="token", gamma=0.9), TOKENS),
              (PearSft(level="block", target_mode="frozen", normalize="weights"), WEIGHTS),
              (PearSft(level="sequence"), TOKENS), (Grpo(kl_coef=0.1), TOKENS),
              (Grpo(kl_coef=0.1, loss_aggregation="sequence-mean"), ROWS), (OnPolicyDistill(reward_coef=0.5), TOKENS)]


@pytest.mark.parametrize(("objective", "size_counts"), OBJECTIVES,
                         ids=[f"{o.kind}-{getattr(o, 'level', '')}-{size}" for o, size in OBJECTIVES])
def test_losses_ignore_what_sits_at_environment_tokens(objective, size_counts):
    """The same rows with other values at the environment's tokens (log-probs of the model, behaviour, reference,
    rollout and teacher): the same loss, size, statistics and gradient; no gradient reaches those tokens, and a
    token-mean's divisor counts the policy's tokens only."""
    results = []
    for logp_at_env in (0.0, -7.5):
        inputs, mask = multi_turn_inputs(seed=2, logp_at_env=logp_at_env)
        terms = objective.loss(inputs)
        terms.total.backward()
        results.append((float(terms.total.detach()), float(terms.size), terms.stats, inputs.logp.grad))
        assert (inputs.logp.grad[~mask] == 0).all()
    (total, size, stats, grad), (total_2, size_2, stats_2, grad_2) = results
    assert total_2 == pytest.approx(total, rel=1e-6) and size_2 == pytest.approx(size, rel=1e-6)
    assert stats_2 == pytest.approx(stats, rel=1e-6)
    torch.testing.assert_close(grad_2, grad)
    if size_counts == TOKENS:
        assert size == float(mask.sum())
    elif size_counts == ROWS:
        assert size == mask.shape[0]
