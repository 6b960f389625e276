"""GRPO family against hand-computed values."""

import math

import pytest
import torch

from pear_ray.objectives import aggregate, group_advantages, informative_groups_mask, k3_kl, policy_loss

# Groups by id (unsorted, not contiguous): 7 -> samples 0, 2, 3, 5 with rewards [1, 1, 0, 1];
# 3 -> samples 1, 4 with [0, 0]; 5 -> samples 6, 7 with [1, 1]; 9 -> sample 8 alone.
REWARDS = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5])
GROUP_IDS = torch.tensor([7, 3, 7, 7, 3, 7, 5, 5, 9])


def test_group_advantages_hand_computed():
    # group 7: mean 0.75, deviations [0.25, 0.25, -0.75, 0.25], unbiased var = (3 * 0.0625 + 0.5625) / 3 = 0.25,
    # std 0.5 -> [0.5, 0.5, -1.5, 0.5]; every other group has all rewards equal, or one sample -> 0.
    expected = torch.tensor([0.5, 0.0, 0.5, -1.5, 0.0, 0.5, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(REWARDS, GROUP_IDS), expected, rtol=1e-5, atol=1e-5)
    centred = torch.tensor([0.25, 0.0, 0.25, -0.75, 0.0, 0.25, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(REWARDS, GROUP_IDS, scale_by_std=False), centred)


def test_group_advantages_eps_bounds_a_tiny_std():
    # rewards [0, 1e-9]: std = 1e-9 / sqrt 2, advantages +-0.5e-9 / (std + eps) ~ +-0.5e-9 / 1e-3
    adv = group_advantages(torch.tensor([0.0, 1e-9], dtype=torch.float64), torch.tensor([0, 0]), eps=1e-3)
    assert adv.abs().max().item() == pytest.approx(0.5e-9 / (1e-9 / math.sqrt(2) + 1e-3))


def test_informative_groups_mask():
    keep = informative_groups_mask(REWARDS, GROUP_IDS)
    assert keep.tolist() == [True, False, True, True, False, True, False, False, False]
    assert keep.nonzero().squeeze(1).tolist() == [0, 2, 3, 5]
    assert informative_groups_mask(torch.tensor([1, 0, 1, 1]), torch.tensor([0, 0, 1, 1])).tolist() == [
        True, True, False, False
    ]


def test_aggregate_token_and_sequence_mean():
    values = torch.tensor([[1.0, 2.0, 3.0], [10.0, 99.0, 99.0], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert aggregate(values, mask, "token-mean").item() == pytest.approx((1 + 2 + 3 + 10) / 4)
    # row means 2 and 10; the row with no response token is left out
    assert aggregate(values, mask, "sequence-mean").item() == pytest.approx((2 + 10) / 2)
    with pytest.raises(ValueError, match="'token-sum'.*'token-mean', 'sequence-mean'"):
        aggregate(values, mask, "token-sum")


def surrogate_batch():
    # row 0: A = +1, ratios [1.5, 0.5]; row 1: A = -1, ratios [0.5, 1.5]; the third column is padding.
    ratios = torch.tensor([[1.5, 0.5, 7.0], [0.5, 1.5, 7.0]], dtype=torch.float64)
    logp = ratios.log().requires_grad_(True)
    return logp, torch.zeros_like(ratios), torch.tensor([1.0, -1.0]), torch.tensor([[1, 1, 0], [1, 1, 0]])


def test_clipped_surrogate_hand_computed():
    logp, logp_old, adv, mask = surrogate_batch()
    loss, stats = policy_loss(logp, logp_old, adv, mask, eps_low=0.2, eps_high=0.28)
    # l = -min(rA, clip(r, 0.8, 1.28) A):  r=1.5, A=+1 -> -1.28 (clipped);  r=0.5, A=+1 -> -0.5;
    #                                      r=0.5, A=-1 -> +0.8 (clipped);   r=1.5, A=-1 -> +1.5
    assert loss.item() == pytest.approx((-1.28 - 0.5 + 0.8 + 1.5) / 4)
    # Clipped tokens get no gradient; the others get -A r / 4.
    (grad,) = torch.autograd.grad(loss, logp)
    expected = torch.tensor([[0.0, -0.5 / 4, 0.0], [0.0, 1.5 / 4, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(grad, expected)
    kl_15, kl_05 = 0.5 - math.log(1.5), -0.5 - math.log(0.5)  # r - 1 - log r
    assert stats.clip_fraction == pytest.approx(0.5)
    assert stats.mean_ratio == pytest.approx(1.0)
    assert stats.approx_kl == pytest.approx((kl_15 + kl_05) / 2)
    assert stats.tis_capped_fraction == 0.0
    assert set(stats.as_dict()) == {"clip_fraction", "approx_kl", "mean_ratio", "tis_capped_fraction"}


def test_per_token_advantages_and_sequence_mean():
    logp, logp_old, adv, mask = surrogate_batch()
    per_token_adv = adv[:, None].expand(2, 3)
    loss_tok, _ = policy_loss(logp, logp_old, per_token_adv, mask, eps_high=0.28)
    assert loss_tok.item() == pytest.approx((-1.28 - 0.5 + 0.8 + 1.5) / 4)
    loss_seq, _ = policy_loss(logp, logp_old, per_token_adv, mask, eps_high=0.28, aggregation="sequence-mean")
    # mean of the row means (-1.28 - 0.5) / 2 and (0.8 + 1.5) / 2; equal to the token mean as the rows are equal
    assert loss_seq.item() == pytest.approx(((-1.28 - 0.5) / 2 + (0.8 + 1.5) / 2) / 2)


def test_truncated_importance_correction():
    logp, logp_old, adv, mask = surrogate_batch()
    # exp(logp_old - logp_rollout) = [[3, 0.5, 1], [1, 1, 1]]: the 3 is capped at 2
    logp_rollout = -torch.tensor([[3.0, 0.5, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64).log()
    loss, stats = policy_loss(logp, logp_old, adv, mask, eps_high=0.28, logp_rollout=logp_rollout, tis_cap=2.0)
    assert loss.item() == pytest.approx((2 * -1.28 + 0.5 * -0.5 + 0.8 + 1.5) / 4)
    assert stats.tis_capped_fraction == pytest.approx(1 / 4)
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad[0, 1], torch.tensor(0.5 * -0.5 / 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="tis_cap"):
        policy_loss(logp, logp_old, adv, mask, logp_rollout=logp_rollout, tis_cap=0.0)


def test_k3_kl():
    # logp = log 0.5, ref = log 0.25: exp(log 0.5) - log 0.5 - 1 = 0.5 + 0.693147... - 1
    value = k3_kl(torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25)))
    assert value.item() == pytest.approx(0.5 + math.log(2) - 1)
    g = torch.Generator().manual_seed(0)
    logp, ref = -torch.rand(100, generator=g), -torch.rand(100, generator=g)
    assert torch.all(k3_kl(logp, ref) >= 0)
    assert torch.all(k3_kl(logp, logp) == 0)
