"""Where each role runs and how many of it: rollout/scoring actors, learner ranks, the reference actor."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from pear_ray.config.base import Section


class ActorResources(Section):
    """Resources of one actor of a role; custom resources pin roles to node groups on a cluster."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)


class RolloutResources(ActorResources):
    num_actors: int = Field(1, ge=1, description="actors to start with, and the fewest to keep")
    max_actors: int | None = Field(None, ge=1, description="grow up to this many as the cluster has room; "
                                   "null keeps the pool at num_actors")
    max_in_flight: int = Field(2, ge=1, description="batches queued per actor (back-pressure)")
    call_timeout_s: float = Field(900.0, gt=0, description="seconds an actor with work in flight may answer none of "
                                  "it before it counts as hung: it is killed and replaced, its batches re-run. "
                                  "Counted from its last answer, not per queued batch, so it must cover the slowest "
                                  "single batch or weight update; starting up does not count")
    backend: Literal["vllm", "transformers"] = Field(
        "vllm", description="what generates and scores: vLLM, or the model's own transformers forward in the actor "
        "(faster for tiny models on CPU, where vLLM's per-step scheduling outweighs the model)")
    # Extra engine arguments. vLLM's, e.g. on a GPU {dtype: bfloat16, kv_cache_memory_bytes: null,
    # gpu_memory_utilization: 0.85}; the defaults (fp32, a 64 MiB KV cache) suit tiny models on CPU. transformers':
    # dtype, max_rows (rows per forward).
    engine: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _max_not_below_min(self) -> RolloutResources:
        if self.max_actors is not None and self.max_actors < self.num_actors:
            raise ValueError(f"max_actors={self.max_actors} is below num_actors={self.num_actors}")
        return self


class LearnerResources(ActorResources):
    num_ranks: int = Field(1, ge=1)
    zero_stage: Literal[0, 1, 2, 3] = 2
    bf16: bool = Field(False, description="bf16 training with fp32 master weights (GPU)")
    max_tokens_per_micro_batch: int | None = Field(
        None, ge=0, description="per rank: cut each update's rows into micro-batches of at most this many prompt + "
        "response tokens (a longer row alone), each packed without padding, gradients accumulated into one "
        "update; null or 0: one padded forward per update. Near the longest row: sdpa/eager attention over a "
        "packed row still costs its length squared")
    max_restarts: int = Field(0, ge=0, description="times a stage whose learner rank died (killed, out of memory, "
                              "node gone) starts again by itself from its last checkpoint; 0: the stage fails, and "
                              "the same command resumes it")


class ResourcesConfig(Section):
    rollout: RolloutResources = Field(default_factory=RolloutResources)
    learner: LearnerResources = Field(default_factory=LearnerResources)
    reference: ActorResources = Field(default_factory=ActorResources)
