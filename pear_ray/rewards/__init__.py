"""Rewards from a model, the parts that need no Ray: the judge's template and its answer, the classifier's score,
and how the models' scores join the verifier's reward (the pool that runs the models is actors/reward.py).

  judge.py    the judge's template checked and rendered, its answer parsed into a score
  combine.py  the per-model columns and the combined reward
  folders.py  a reward model's folder: given, or a tiny one built on the spot; what a folder's config says it is
"""

from pear_ray.rewards.combine import VERIFIER_REWARD, combined_reward, model_reward_columns, reward_column, sigmoid
from pear_ray.rewards.folders import build_tiny_classifier, folder_kind_problem, resolve_reward_model
from pear_ray.rewards.judge import TEMPLATE_FIELDS, check_template, parse_judge_score, render_template

__all__ = ["TEMPLATE_FIELDS", "VERIFIER_REWARD", "build_tiny_classifier", "check_template", "combined_reward",
           "folder_kind_problem", "model_reward_columns", "parse_judge_score", "render_template",
           "resolve_reward_model", "reward_column", "sigmoid"]
