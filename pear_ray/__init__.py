"""pear_ray: Ray-distributed LLM post-training with PEAR-weighted SFT, then GRPO.

Layout, by layer (imports point down; tests/unit/test_layers.py checks it):
  atomic, faults, messages, plugins, runtime, hub, storage
                                whole-file writes, kill points, message text, plug-in loading, Ray start-up with the
                                workers' environment, the Hugging Face Hub, run folders in a bucket
  objectives/, data/, models/   the math as pure torch functions; the Arrow data plane; tiny local models
  config/, tasks/, tracking/    the typed job config; tasks and verifiers; metrics, reports and plots
  engines/      one process's work, no Ray: the rollout engines (vLLM, transformers), the DeepSpeed learner rank
  actors/       Ray around the engines: rollout and reference workers, the pool, the learner group
  stages/       the training loop and the stages (prior, score, sft, rl, eval)
  driver/       a job's stages into one run folder; experiments; preflight; inspect
  cli.py, submit.py   the `pear-ray` command and cluster submission
The design notes are docs/design.md.

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
