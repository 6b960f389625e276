"""The tiers and the shared fixtures.

Tiers, by folder (each test gets its folder's marker, so `-m unit` and the like select them too):
  unit/         pure code: the math, configs, schemas, reports, the CLI's parsing; no Ray, no engine (make test-fast)
  integration/  one part for real: Ray actors and pools, vLLM and transformers engines, the DeepSpeed learner, a stage
  e2e/          whole jobs as a user runs them: `pear-ray` in a subprocess, submitted to a real Ray head
`slow` marks the long end-to-end tests of any tier: `make test` leaves them out, `make test-all` runs everything.
Fixtures: one tiny model folder per session (built locally, no downloads) and one embedded Ray instance.
"""

from pathlib import Path

import pytest
from support.stores import GcsStore, S3Store, gcs_emulator, moto_server

from pear_ray.models import TinyModelSpec, build_tiny_model

TIERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(items):
    """Each test carries the marker of its tier's folder."""
    for item in items:
        tier = next((part for part in Path(item.fspath).parts if part in TIERS), None)
        if tier is None:
            raise pytest.UsageError(f"{item.nodeid}: a test belongs in one of the tiers' folders {TIERS}")
        item.add_marker(tier)


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


@pytest.fixture(scope="module")
def s3() -> S3Store:
    """moto's S3 server on a free loopback port, for the module's tests; stopped after them."""
    with moto_server() as store:
        yield store


@pytest.fixture(scope="module")
def gcs() -> GcsStore:
    """A GCS emulator on a free loopback port, for the module's tests; stopped after them."""
    with gcs_emulator() as store:
        yield store


@pytest.fixture
def s3_env(s3, monkeypatch, tmp_path) -> S3Store:
    """This process pointed at the module's store (the standard variables), with a scratch folder of the test's own."""
    for name, value in s3.env(PEAR_RAY_SCRATCH=str(tmp_path / "scratch")).items():
        monkeypatch.setenv(name, value)
    return s3
