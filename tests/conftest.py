"""Shared fixtures: one tiny model folder per test session (built locally, no downloads)."""

from pathlib import Path

import pytest

from pear_ray.models import TinyModelSpec, build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The default tiny Qwen2 model (head_dim 32, fp32), built once per session."""
    return build_tiny_model(TinyModelSpec(), tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def ray_cluster():
    """One embedded Ray instance on loopback for the whole session; shut down only if this session started it."""
    import ray

    from pear_ray.runtime import init_ray

    started = not ray.is_initialized()
    init_ray(num_cpus=4)
    yield
    if started:
        ray.shutdown()
