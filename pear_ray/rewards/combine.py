"""The reward models' scores beside the verifier's: one column per model, and the reward RL trains on,
verifier_weight x verifier + the sum of weight_i x model_i."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

REWARD_COLUMN_PREFIX = "reward_"
VERIFIER_REWARD = "verifier_reward"  # RL with reward models: the verifier's part, beside the combined `reward`


def reward_column(name: str) -> str:
    """The column of a reward model's scores, e.g. `reward_helpful`."""
    return f"{REWARD_COLUMN_PREFIX}{name}"


def model_reward_columns(columns: Sequence[str]) -> list[str]:
    """Of a table's columns (or a figures dict's keys), the reward models' scores (and counts: reward_<name>_...)
    and the verifier's part of a combined reward."""
    return [column for column in columns if column.startswith(REWARD_COLUMN_PREFIX) or column == VERIFIER_REWARD]


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """A classifier's logit as a score in [0, 1] (float64, no overflow for large |logit|)."""
    logits = np.asarray(logits, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -logits))


def combined_reward(verifier: np.ndarray, scores: Mapping[str, np.ndarray], verifier_weight: float,
                    weights: Mapping[str, float]) -> np.ndarray:
    """verifier_weight x verifier + sum over the models of weight x score, per sample (float64)."""
    total = verifier_weight * np.asarray(verifier, dtype=np.float64)
    for name, score in scores.items():
        total = total + weights[name] * np.asarray(score, dtype=np.float64)
    return total
