"""pear_ray: Ray-distributed LLM post-training with PEAR-weighted SFT, then GRPO.

Layout (data flows top to bottom):
  config.py      the typed job config (YAML + dotted overrides)
  atomic.py      files and folders written whole: a temporary name, then a rename
  data/          the Arrow data plane: schema, readers, padded-tensor conversion
  objectives/    the math as pure torch functions: PEAR weights and loss, GRPO losses, pass@k
  models/        tiny local models for tests and the demo
  engines/       one process's worth of work, no Ray: vLLM generation/scoring, DeepSpeed learner rank
  actors/        Ray actors around the engines, the rollout pool, the learner group
  cli.py         the `pear-ray` command

The math is re-exported here (`pear_ray.pear_weights`, ...) but imported only when first used: Ray imports this
package in every worker before giving it its CPUs (runtime.worker_logs_to_files), and torch imported then would
size its thread pool for the whole machine.
"""

import importlib

__all__ = [
    "PearDiagnostics",
    "group_advantages",
    "k3_kl",
    "mean_pass_at_k",
    "pass_at_k",
    "pear_loss",
    "pear_weights",
    "policy_loss",
]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("pear_ray.objectives"), name)
    raise AttributeError(f"module 'pear_ray' has no attribute {name!r}")
