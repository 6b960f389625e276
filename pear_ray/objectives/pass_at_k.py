"""Unbiased pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").

From n >= k samples of a prompt, c of them correct:

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1 .. n} (1 - k / i)

The product form never builds the huge binomials; pass@k is 1 whenever fewer than k samples are wrong.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from the n is correct."""
    n, c, k = operator.index(n), operator.index(c), operator.index(k)
    if n < 0 or c < 0 or k < 1:
        raise ValueError(f"need n >= 0, c >= 0 and k >= 1; got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least k samples; got n={n}")
    if c > n:
        raise ValueError(f"c={c} correct out of n={n} samples is impossible")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(correct_counts: Sequence[int], n: int | Sequence[int], k: int) -> float:
    """Mean pass@k over prompts; ``n`` is one sample count for all prompts or one per prompt."""
    sample_counts = [n] * len(correct_counts) if isinstance(n, int) else list(n)
    if len(sample_counts) != len(correct_counts):
        raise ValueError(f"{len(correct_counts)} correct counts but {len(sample_counts)} sample counts")
    if not correct_counts:
        raise ValueError("mean pass@k of no prompts")
    return math.fsum(pass_at_k(ni, ci, k) for ni, ci in zip(sample_counts, correct_counts)) / len(correct_counts)
