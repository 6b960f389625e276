"""The shipped job configs, installed as the package data `pear_ray.jobs` (see pyproject.toml)."""
