"""The rollout backends: the engine that `resources.rollout.engine` names (its `backend`), started. An engine's
module is imported only when it is chosen: vLLM's sets vLLM's environment variables at import, and an actor on the
transformers backend never loads vLLM."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pear_ray.config import EngineOptions, TransformersOptions
from pear_ray.engines.rollout_engine import RolloutEngine

if TYPE_CHECKING:
    import torch


def start_engine(model_dir: str | Path, options: EngineOptions | None = None, *, seed: int = 0,
                 model: torch.nn.Module | None = None) -> RolloutEngine:
    """The engine of `options` (None: vLLM's, with its defaults) on a model folder; `seed` seeds calls without one.
    `model`: a loaded model of that folder that the transformers engine serves as it is, with no copy (colocated RL:
    the module a learner rank trains); vLLM loads its own copy whatever."""
    if isinstance(options, TransformersOptions):
        from pear_ray.engines.transformers_engine import TransformersEngine

        return TransformersEngine(model_dir, options, seed=seed, model=model)
    from pear_ray.engines.vllm_engine import VllmEngine

    return VllmEngine(model_dir, options, seed=seed)
