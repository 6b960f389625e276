"""Multi-turn environments: the gymnasium-shaped interface (base.py), the environments pear_ray ships (one module
each, registering its kind), and how they run beside the rollout (stepping.py: Ray tasks, a per-step timeout).

`pear_ray.environments` imports every module of the package, so a new environment is one new file here.
"""

from __future__ import annotations

import importlib
import pkgutil

from pear_ray.environments.base import ENVIRONMENTS, Environment, observation_ids, register_environment

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ENVIRONMENTS", "Environment", "observation_ids", "register_environment"]
