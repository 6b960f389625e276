"""PEAR weights and loss: hand-computed cases, properties, an independent loop reference, and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from pear_ray.objectives import PEAR_LEVELS, pear_loss, pear_weights, token_logprobs


def reference_weights(lt, lb, mask, level, gamma, block_size, delta_clip=(-0.08, 0.3), log_weight_clip=(-10.0, 5.0)):
    """The formulas of objectives/pear.py's docstring with plain Python loops over rows and tokens, for comparison only."""
    out = [[0.0] * len(row) for row in mask]
    for b, row in enumerate(mask):
        cols = [i for i, m in enumerate(row) if m]  # response tokens, in order: t = 1..T
        T = len(cols)
        d = [min(max(lt[b][i] - lb[b][i], delta_clip[0]), delta_clip[1]) for i in cols]  # d[t - 1]
        for t in range(1, T + 1):
            if level == "none":
                log_g = 0.0
            elif level == "sequence":
                log_g = sum(d[j - 1] for j in range(1, T + 1))
            elif level == "token":
                log_g = (T - t) * math.log(gamma) + sum(d[j - 1] for j in range(t + 1, T + 1))
            else:  # block: k from 1, e_k = min(kB, T), later blocks are positions e_k + 1..T
                k = math.ceil(t / block_size)
                e_k = min(k * block_size, T)
                log_g = (T - e_k) * math.log(gamma) + sum(d[j - 1] for j in range(e_k + 1, T + 1))
            out[b][cols[t - 1]] = math.exp(min(max(log_g, log_weight_clip[0]), log_weight_clip[1]))
    return out


def padded_batch(seed, dtype=torch.float64, batch=6, length=40):
    """Rows with left padding (a prompt), right padding, different lengths, and one row without response tokens.

    Log-ratios spread wide enough that both delta clips and, over long rows, both log-weight clips are hit.
    """
    g = torch.Generator().manual_seed(seed)
    lb = -torch.rand(batch, length, generator=g, dtype=torch.float64) * 3
    lt = lb + 0.2 + torch.randn(batch, length, generator=g, dtype=torch.float64) * 0.3
    mask = torch.zeros(batch, length, dtype=torch.bool)
    spans = [(0, length), (5, length), (0, 23), (7, 30), (12, 13)]  # [start, end) of each row's response
    for b, (start, end) in enumerate(spans):
        mask[b, start:end] = True  # the last row keeps no response token
    return lt.to(dtype), lb.to(dtype), mask


# d_raw = lt - lb = [0.1, -0.5, 1.0] clips to d = [0.1, -0.08, 0.3]; gamma = 0.5, so log(gamma) = -log 2.
# The response sits at columns 1..3 of 5: one prompt token on the left, one padding token on the right.
HAND_LB = [[-2.0, -1.0, -1.0, -1.0, -3.0]]
HAND_LT = [[-0.5, -0.9, -1.5, 0.0, -9.0]]
HAND_MASK = [[0, 1, 1, 1, 0]]
HAND_EXPECTED = {
    "none": [0.0, 1.0, 1.0, 1.0, 0.0],
    # log G = d1 + d2 + d3 = 0.1 - 0.08 + 0.3 = 0.32 for every token
    "sequence": [0.0, math.exp(0.32), math.exp(0.32), math.exp(0.32), 0.0],
    # t=1: 2 log 0.5 + d2 + d3 -> 0.25 e^0.22;  t=2: log 0.5 + d3 -> 0.5 e^0.3;  t=3 (last): 0 -> 1
    "token": [0.0, 0.25 * math.exp(0.22), 0.5 * math.exp(0.3), 1.0, 0.0],
    # B=2: block 1 = {1, 2}, e_1 = 2: (3-2) log 0.5 + d3 -> 0.5 e^0.3;  block 2 = {3}, e_2 = min(4, 3) = 3 -> 1
    "block": [0.0, 0.5 * math.exp(0.3), 0.5 * math.exp(0.3), 1.0, 0.0],
}


@pytest.mark.parametrize("level", PEAR_LEVELS)
def test_hand_computed(level):
    lt, lb = torch.tensor(HAND_LT, dtype=torch.float64), torch.tensor(HAND_LB, dtype=torch.float64)
    w = pear_weights(lt, lb, torch.tensor(HAND_MASK), level, gamma=0.5, block_size=2)
    torch.testing.assert_close(w, torch.tensor([HAND_EXPECTED[level]], dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_hand_computed_block_of_three():
    # T=5, B=3, gamma=1, d = [0.1, 0.2, 0.3, -0.05, 0.25] (all inside the clip).
    # block 1 = {1, 2, 3}, e_1 = 3: d4 + d5 = 0.2;  block 2 = {4, 5}, e_2 = min(6, 5) = 5: nothing later -> 0
    lt = torch.tensor([[0.1, 0.2, 0.3, -0.05, 0.25]], dtype=torch.float64)
    w = pear_weights(lt, torch.zeros_like(lt), torch.ones_like(lt), "block", gamma=1.0, block_size=3)
    expected = [math.exp(0.2)] * 3 + [1.0, 1.0]
    torch.testing.assert_close(w, torch.tensor([expected], dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("level", PEAR_LEVELS)
@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("block_size", [1, 3, 4, 7])
def test_matches_loop_reference(level, gamma, block_size):
    for seed in range(3):
        lt, lb, mask = padded_batch(seed)
        expected = reference_weights(lt.tolist(), lb.tolist(), mask.tolist(), level, gamma, block_size)
        expected = torch.tensor(expected, dtype=torch.float64)
        got64 = pear_weights(lt, lb, mask, level, gamma=gamma, block_size=block_size)
        assert got64.dtype == torch.float64
        torch.testing.assert_close(got64, expected, rtol=1e-6, atol=1e-6)
        got32 = pear_weights(lt.float(), lb.float(), mask, level, gamma=gamma, block_size=block_size)
        assert got32.dtype == torch.float32
        torch.testing.assert_close(got32.double(), expected, rtol=1e-5, atol=1e-5)


def test_reference_batch_reaches_every_clip():
    """The random batches above are only a strong check if they exercise both clips of d and of log G."""
    lt, lb, mask = padded_batch(0)
    d = (lt - lb)[mask]
    assert (d < -0.08).any() and (d > 0.3).any()
    floor = pear_weights(lt, lb, mask, "token", gamma=0.5)[mask]
    assert torch.isclose(floor, torch.tensor(math.exp(-10.0), dtype=floor.dtype)).any()
    ceiling = pear_weights(lt, lb, mask, "token", gamma=1.0)[mask]
    assert torch.isclose(ceiling, torch.tensor(math.exp(5.0), dtype=ceiling.dtype)).any()


def test_block_size_one_is_token_level():
    lt, lb, mask = padded_batch(1)
    torch.testing.assert_close(
        pear_weights(lt, lb, mask, "block", block_size=1), pear_weights(lt, lb, mask, "token"), rtol=0, atol=0
    )


@pytest.mark.parametrize("level", PEAR_LEVELS)
@pytest.mark.parametrize("block_size", [1, 4])
def test_target_equal_behaviour_and_gamma_one_gives_unit_weights(level, block_size):
    _, lb, mask = padded_batch(2)
    w = pear_weights(lb, lb, mask, level, gamma=1.0, block_size=block_size)
    assert torch.equal(w, mask.double())


@pytest.mark.parametrize("gamma", [0.5, 0.999, 1.0])
def test_last_response_token_has_weight_one_at_token_level(gamma):
    lt, lb, mask = padded_batch(3)
    w = pear_weights(lt, lb, mask, "token", gamma=gamma)
    rows = mask.any(1)
    last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)  # column of each row's last response token
    torch.testing.assert_close(w[rows, last[rows]], torch.ones(int(rows.sum()), dtype=w.dtype))


def test_sequence_weights_are_constant_along_a_row():
    lt, lb, mask = padded_batch(4)
    w = pear_weights(lt, lb, mask, "sequence")
    for row_w, row_m in zip(w, mask):
        if row_m.any():
            assert torch.all(row_w[row_m] == row_w[row_m][0])


@pytest.mark.parametrize("level", PEAR_LEVELS)
def test_weights_within_clip_bounds_and_zero_off_response(level):
    lt, lb, mask = padded_batch(5)
    lt = lb + torch.randn(lt.shape, generator=torch.Generator().manual_seed(5), dtype=lt.dtype) * 5
    w = pear_weights(lt, lb, mask, level, gamma=0.7)
    assert torch.all(w[~mask] == 0)
    assert torch.all(w[mask] >= math.exp(-10.0) * (1 - 1e-12))
    assert torch.all(w[mask] <= math.exp(5.0) * (1 + 1e-12))


@pytest.mark.parametrize("level", PEAR_LEVELS)
def test_padding_on_either_side_gives_the_unpadded_weights(level):
    g = torch.Generator().manual_seed(6)
    lb_row = -torch.rand(9, generator=g, dtype=torch.float64)
    lt_row = lb_row + torch.randn(9, generator=g, dtype=torch.float64) * 0.2
    alone = pear_weights(lt_row[None], lb_row[None], torch.ones(1, 9), level, gamma=0.9, block_size=4)[0]
    # Row 0: 3 prompt tokens on the left and 2 padding tokens on the right; row 1: 5 padding tokens on the left.
    # Off-response log-probs are NaN / inf: they must not leak into the weights.
    lt = torch.full((2, 14), float("nan"), dtype=torch.float64)
    lb = torch.full((2, 14), float("-inf"), dtype=torch.float64)
    mask = torch.zeros(2, 14, dtype=torch.bool)
    for b, start in enumerate([3, 5]):
        lt[b, start:start + 9], lb[b, start:start + 9], mask[b, start:start + 9] = lt_row, lb_row, True
    w = pear_weights(lt, lb, mask, level, gamma=0.9, block_size=4)
    assert not w.isnan().any()
    torch.testing.assert_close(w[0, 3:12], alone, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w[1, 5:14], alone, rtol=1e-12, atol=1e-12)
    assert torch.all(w[~mask] == 0)


@pytest.mark.parametrize("level", PEAR_LEVELS)
def test_row_without_response_tokens_is_all_zero(level):
    lt, lb, mask = padded_batch(7)
    w = pear_weights(lt, lb, mask, level)
    assert not w.isnan().any()
    assert torch.all(w[-1] == 0)


def test_mask_may_be_bool_or_zero_one():
    lt, lb, mask = padded_batch(8)
    w = pear_weights(lt, lb, mask, "block")
    torch.testing.assert_close(pear_weights(lt, lb, mask.long(), "block"), w, rtol=0, atol=0)
    torch.testing.assert_close(pear_weights(lt, lb, mask.double(), "block"), w, rtol=0, atol=0)


def test_weights_carry_no_gradient():
    lt, lb, mask = padded_batch(9)
    lt.requires_grad_(True)
    assert not pear_weights(lt, lb, mask, "token").requires_grad


def test_invalid_parameters_are_refused():
    lt, lb, mask = padded_batch(0)
    with pytest.raises(ValueError, match=r"'tokens'.*'none', 'sequence', 'token', 'block'"):
        pear_weights(lt, lb, mask, "tokens")
    for gamma in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="gamma"):
            pear_weights(lt, lb, mask, "token", gamma=gamma)
    for block_size in (0, -1, 2.5):
        with pytest.raises(ValueError, match="block_size"):
            pear_weights(lt, lb, mask, "block", block_size=block_size)
    with pytest.raises(ValueError, match="shapes differ"):
        pear_weights(lt, lb[:, 1:], mask, "token")


# ---- loss ---------------------------------------------------------------------------------------------------------


def sft_batch(seed, batch=4, length=12, vocab=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(vocab, (batch, length), generator=g)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for b, (start, end) in enumerate([(2, 12), (0, 7), (5, 9), (3, 3)]):
        mask[b, start:end] = True
    logp_behavior = -torch.rand(batch, length, generator=g, dtype=torch.float64) * 3
    return logits, labels, mask, logp_behavior


def test_token_logprobs_equal_log_softmax_gather():
    logits, labels, _, _ = sft_batch(0)
    expected = logits.log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, labels), expected)


def test_level_none_is_canonical_sft_in_value_and_gradient():
    logits, labels, mask, lb = sft_batch(1)
    loss, _ = pear_loss(token_logprobs(logits, labels), lb, mask, level="none")
    (grad,) = torch.autograd.grad(loss, logits)
    ignored = torch.where(mask, labels, -100)  # also checks that an ignore index in the labels is harmless
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ignored.reshape(-1), ignore_index=-100)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    loss_ignored, _ = pear_loss(token_logprobs(logits, ignored), lb, mask, level="none")
    torch.testing.assert_close(loss_ignored, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("level", ["sequence", "token", "block"])
def test_weight_is_not_differentiated(level):
    logits, labels, mask, lb = sft_batch(2)
    loss, _ = pear_loss(token_logprobs(logits, labels), lb, mask, level=level, gamma=0.9)
    (grad,) = torch.autograd.grad(loss, logits)
    logp = token_logprobs(logits, labels)
    w = pear_weights(logp.detach(), lb, mask, level, gamma=0.9)
    expected = (w.detach() * -logp)[mask].sum() / mask.sum()
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


def test_frozen_target_and_plugged_in_loss():
    logits, labels, mask, lb = sft_batch(3)
    logp = token_logprobs(logits, labels)
    frozen = lb + 0.1
    per_token = (logits.square().mean(-1))  # any per-token loss, e.g. a distillation term
    loss, _ = pear_loss(logp, lb, mask, target_mode="frozen", logp_target_frozen=frozen, per_token_loss=per_token)
    w = pear_weights(frozen, lb, mask, "token")
    torch.testing.assert_close(loss, (w * per_token)[mask].sum() / mask.sum(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="logp_target_frozen"):
        pear_loss(logp, lb, mask, target_mode="frozen")
    with pytest.raises(ValueError, match="logp_target_frozen"):
        pear_loss(logp, lb, mask, logp_target_frozen=frozen)
    with pytest.raises(ValueError, match="'offline'"):
        pear_loss(logp, lb, mask, target_mode="offline")


def test_explicit_token_count_is_the_divisor():
    logits, labels, mask, lb = sft_batch(4)
    logp = token_logprobs(logits, labels)
    local, _ = pear_loss(logp, lb, mask, level="block")
    global_, _ = pear_loss(logp, lb, mask, level="block", num_tokens=4 * int(mask.sum()))
    torch.testing.assert_close(global_, local / 4)
    # a global count over the world size can be fractional; it is used as given
    half, _ = pear_loss(logp, lb, mask, level="block", num_tokens=0.5)
    torch.testing.assert_close(half, local * 2 * int(mask.sum()))


def test_normalize_weights_divides_by_the_weight_sum_hand_computed():
    """normalize tokens: sum w l / N, so the step scales with the mean weight; weights: sum w l / sum w."""
    logp, lb, mask = (torch.tensor(x, dtype=torch.float64) for x in (HAND_LT, HAND_LB, HAND_MASK))
    w = [0.25 * math.exp(0.22), 0.5 * math.exp(0.3), 1.0]  # HAND_EXPECTED["token"] at gamma 0.5
    weighted = w[0] * 0.9 + w[1] * 1.5 + w[2] * 0.0  # l_t = -logp_t on the response: 0.9, 1.5, 0.0
    settings = dict(level="token", gamma=0.5, mask=mask.bool())
    tokens, _ = pear_loss(logp, lb, **settings)
    weights, _ = pear_loss(logp, lb, **settings, normalize="weights")
    assert tokens.item() == pytest.approx(weighted / 3, rel=1e-12)
    assert weights.item() == pytest.approx(weighted / sum(w), rel=1e-12)
    # under data parallelism the caller gives the global weight sum (over the world size, as for num_tokens)
    share, _ = pear_loss(logp, lb, **settings, normalize="weights", weight_sum=0.5)
    assert share.item() == pytest.approx(weighted / 0.5, rel=1e-12)
    with pytest.raises(ValueError, match="num_tokens"):
        pear_loss(logp, lb, **settings, normalize="weights", num_tokens=3)
    with pytest.raises(ValueError, match="weight_sum"):
        pear_loss(logp, lb, **settings, weight_sum=1.0)
    with pytest.raises(ValueError, match="'sequences'"):
        pear_loss(logp, lb, **settings, normalize="sequences")


def test_diagnostics_hand_computed():
    # One row, T=20, gamma=1, d_raw = 1.0 -> d = 0.3: token-level log G_t = 0.3 (20 - t), which is >= 5 for
    # t = 1, 2, 3 (5.7, 5.4, 5.1), so 3 / 20 weights at the ceiling and none at the floor.
    lb = -torch.ones(1, 20, dtype=torch.float64)
    logp = lb + 1.0
    mask = torch.ones(1, 20, dtype=torch.bool)
    _, diag = pear_loss(logp, lb, mask, level="token", gamma=1.0)
    w = [math.exp(min(0.3 * (20 - t), 5.0)) for t in range(1, 21)]
    assert diag.num_tokens == 20
    assert diag.frac_at_ceiling == pytest.approx(3 / 20)
    assert diag.frac_at_floor == 0.0
    assert diag.mean_weight == pytest.approx(sum(w) / 20)
    assert diag.ess == pytest.approx(sum(w) ** 2 / sum(x * x for x in w))
    assert diag.ess_fraction == pytest.approx(diag.ess / 20)
    assert diag.mean_log_ratio == pytest.approx(1.0)  # before clipping
    assert set(diag.as_dict()) == {"mean_weight", "ess", "ess_fraction", "frac_at_floor", "frac_at_ceiling",
                                   "mean_log_ratio", "num_tokens"}


def test_diagnostics_floor_and_level_none():
    # d_raw = -1 -> d = -0.08 per token, 200 tokens, gamma=1: log G_t = -0.08 (200 - t) <= -10 for t <= 75.
    lb = torch.zeros(1, 200, dtype=torch.float64)
    mask = torch.ones(1, 200, dtype=torch.bool)
    _, diag = pear_loss(lb - 1.0, lb, mask, level="token", gamma=1.0)
    assert diag.frac_at_floor == pytest.approx(75 / 200)
    _, diag = pear_loss(lb - 1.0, lb, mask, level="none")
    assert (diag.mean_weight, diag.ess, diag.ess_fraction, diag.frac_at_floor) == pytest.approx((1, 200, 1, 0))


@pytest.mark.parametrize("level", PEAR_LEVELS)
def test_batch_without_response_tokens_has_no_nan(level):
    logits, labels, _, lb = sft_batch(5)
    mask = torch.zeros(labels.shape, dtype=torch.bool)
    loss, diag = pear_loss(token_logprobs(logits, labels), lb, mask, level=level)
    (grad,) = torch.autograd.grad(loss, logits)
    assert loss.item() == 0.0 and torch.all(grad == 0)
    assert all(math.isfinite(v) for v in diag.as_dict().values())
    assert diag.num_tokens == 0 and diag.ess == 0.0
