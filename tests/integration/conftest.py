"""Fixtures the integration modules share."""

import pytest
import ray

from pear_ray.actors.rollout import RolloutWorker
from pear_ray.config import TransformersOptions, VllmOptions

ENGINES = {"vllm": VllmOptions(), "transformers": TransformersOptions()}


@pytest.fixture(scope="module", params=list(ENGINES))
def rollout(request, ray_cluster, tiny_model_dir):
    """A rollout actor of each backend (resources.rollout.engine.backend), one of each for the module that asks."""
    actor = ray.remote(RolloutWorker).options(num_cpus=0.5).remote(tiny_model_dir, seed=0,
                                                                    engine=ENGINES[request.param])
    yield actor
    ray.kill(actor)
