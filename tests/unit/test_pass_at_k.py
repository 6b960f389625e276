"""Unbiased pass@k against binomials and hand-computed values."""

import math

import pytest

from pear_ray.objectives import mean_pass_at_k, pass_at_k


def test_hand_computed():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))  # 1 - 3/10 = 0.7
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)  # pass@1 = c / n
    assert pass_at_k(8, 0, 8) == 0.0
    assert pass_at_k(8, 8, 1) == 1.0
    assert pass_at_k(8, 1, 8) == 1.0  # fewer than k wrong samples: every k-subset holds a correct one


def test_matches_binomial_form():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_stable_for_large_n():
    # C(999, 500) / C(1000, 500) = 500 / 1000 exactly; the binomials themselves have ~300 digits
    assert pass_at_k(1000, 1, 500) == pytest.approx(0.5, abs=1e-12)
    assert 0.0 < pass_at_k(100_000, 3, 10) < 1.0


@pytest.mark.parametrize("n, c, k", [(4, 1, 5), (4, 5, 1), (-1, 0, 1), (4, -1, 1), (4, 1, 0), (4, 1, -2)])
def test_invalid_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_mean_over_prompts():
    assert mean_pass_at_k([2, 0, 5], 5, 2) == pytest.approx((0.7 + 0.0 + 1.0) / 3)
    assert mean_pass_at_k([2, 1], [5, 4], 1) == pytest.approx((2 / 5 + 1 / 4) / 2)  # per-prompt n
    with pytest.raises(ValueError):
        mean_pass_at_k([1, 2], [4], 1)
    with pytest.raises(ValueError):
        mean_pass_at_k([], 4, 1)
