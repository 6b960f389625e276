"""Engines behind the actors: vLLM for rollouts/scoring (CPU and GPU builds alike), plus the learner's engines.

Exports are lazy: importing vllm_engine sets vLLM/torch environment variables for the process (see that module),
which must not leak into a learner that only imports a sibling module.
"""

import importlib

_EXPORTS = {name: "pear_ray.engines.vllm_engine" for name in ("EngineError", "Sample", "VllmEngine", "check_model_dir")}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
