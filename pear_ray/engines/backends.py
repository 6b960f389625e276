"""The rollout backends: the engine that `resources.rollout.engine` names (its `backend`), started. An engine's
module is imported only when it is chosen: vLLM's sets vLLM's environment variables at import, and an actor on the
transformers backend never loads vLLM."""

from __future__ import annotations

from pathlib import Path

from pear_ray.config import EngineOptions, TransformersOptions
from pear_ray.engines.rollout_engine import RolloutEngine


def start_engine(model_dir: str | Path, options: EngineOptions | None = None, *, seed: int = 0) -> RolloutEngine:
    """The engine of `options` (None: vLLM's, with its defaults) on a model folder; `seed` seeds calls without one."""
    if isinstance(options, TransformersOptions):
        from pear_ray.engines.transformers_engine import TransformersEngine

        return TransformersEngine(model_dir, options, seed=seed)
    from pear_ray.engines.vllm_engine import VllmEngine

    return VllmEngine(model_dir, options, seed=seed)
