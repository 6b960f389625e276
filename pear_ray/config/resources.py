"""Where each role runs and how many of it: rollout/scoring actors (and the engine each runs), learner ranks, the
reference actor."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from pear_ray.config.base import Section


class ActorResources(Section):
    """Resources of one actor of a role; custom resources pin roles to node groups on a cluster."""

    num_cpus: float = Field(1.0, ge=0, description="Ray CPUs each actor of the role takes; its torch threads are this, "
                            "rounded to the nearest, at least 1 (fractions let several actors share a core on a laptop)")
    num_gpus: float = Field(0.0, ge=0, description="Ray GPUs each actor takes (0: CPU only; any role above 0 makes "
                            "the job a GPU job, and the workers then use the CUDA accelerator)")
    resources: dict[str, float] = Field(default_factory=dict, description="Ray custom resources each actor needs, "
                                        "e.g. {rollout_node: 1}: how a cluster puts a role on its own node group "
                                        "(cluster/ declares them per node type)")


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # LoRA ranks vLLM has kernels for


class VllmOptions(Section):
    """The vLLM engine (engines/vllm_engine.py). The defaults suit tiny models on CPU; on a GPU, e.g. {dtype:
    bfloat16, kv_cache_memory_bytes: null, gpu_memory_utilization: 0.85}."""

    backend: Literal["vllm"] = Field("vllm", description="the engine: vLLM (the default when no backend is given)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="weights and activations: float32 gives log-probs within ~5e-7 of the learner's "
        "fp32 forward (bf16: ~2e-3); bfloat16 or float16 on a GPU; auto: the checkpoint's")
    kv_cache_memory_bytes: int | None = Field(
        64 * 2**20, ge=1, description="the KV cache's size in bytes (64 MiB suits tiny models on CPU); null: vLLM "
        "sizes it from gpu_memory_utilization")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="share of the GPU's memory vLLM may take (weights, activations, KV cache) when "
        "kv_cache_memory_bytes is null; null: vLLM's default (0.92 in vLLM 0.32)")
    max_model_len: int | None = Field(None, ge=1, description="the longest prompt + response in tokens; null: the "
                                      "model's own limit (a smaller one shrinks the KV cache vLLM must have room for)")
    enforce_eager: bool = Field(
        True, description="no CUDA graphs or torch.compile: a start in seconds, what CPU needs; false on a GPU for "
        "throughput (and export TORCHDYNAMO_DISABLE=0)")
    max_logprobs: int = Field(
        20, ge=-1, description="the most top-k log-probs vLLM gives per position; -1: the whole vocabulary. "
        "score.teacher_topk = k raises it to k for the score stage")
    max_lora_rank: Literal[VLLM_LORA_RANKS] | None = Field(
        None, description="serve LoRA adapters (update_adapter: a policy version is base + the learner's adapter) "
        "of rank up to this, one at a time; at least the adapter's r (the ranks vLLM has kernels for). null: no LoRA "
        "(RL with models.student.lora sets the smallest that fits)")
    args: dict[str, Any] = Field(
        default_factory=dict, description="any other vllm.LLM keyword, passed as is (e.g. max_num_seqs, "
        "enable_prefix_caching, tensor_parallel_size)")

    @field_validator("args")
    @classmethod
    def _args_are_not_typed_fields(cls, args: dict[str, Any]) -> dict[str, Any]:
        if typed := sorted(set(args) & (set(cls.model_fields) - {"backend", "args"})):
            raise ValueError(f"{typed} are options of their own: set resources.rollout.engine.{typed[0]}, not in args")
        if fixed := sorted(set(args) & {"model", "seed", "distributed_executor_backend", "logprobs_mode", "enable_lora",
                                        "max_loras"}):
            raise ValueError(f"{fixed} are set by the engine (the model folder, the job's seed, an in-process engine "
                             "that reports the sampler's log-probs, one LoRA slot when max_lora_rank is set)")
        return args


class TransformersOptions(Section):
    """The model's own transformers forward in the actor (engines/transformers_engine.py): for tiny models on CPU,
    where vLLM's per-step scheduling outweighs the model."""

    backend: Literal["transformers"] = Field("transformers", description="the engine: the model's own transformers "
                                             "forward with a KV cache, in the actor (tiny models on CPU)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights and activations")
    max_rows: int = Field(256, ge=1, description="rows (prompt x sample) per forward when generating or scoring: "
                          "bounds the memory of a call")


def _backend(value: Any) -> str:
    """Engine options without a `backend` are vLLM's, the default, so `resources.rollout.engine.dtype=...` alone
    works as an override."""
    return value.get("backend", "vllm") if isinstance(value, dict) else value.backend


EngineOptions = Annotated[Annotated[VllmOptions, Tag("vllm")] | Annotated[TransformersOptions, Tag("transformers")],
                          Discriminator(_backend)]


def serving_adapters(engine: EngineOptions, r: int) -> EngineOptions:
    """The rollout engine's options for RL that syncs LoRA adapters of rank `r`: vLLM with a LoRA slot (the smallest
    rank of its kernels that fits, unless given); the transformers backend as it is."""
    if not isinstance(engine, VllmOptions) or engine.max_lora_rank is not None:
        return engine
    return engine.model_copy(update={"max_lora_rank": min(rank for rank in VLLM_LORA_RANKS if rank >= r)})


class PoolScaling(Section):
    """How an elastic rollout/scoring pool (max_actors set) sizes itself between num_actors and max_actors, through
    the cluster's autoscaler (ray.autoscaler.sdk.request_resources; a no-op on a cluster without one)."""

    by: Literal["max", "wait"] = Field(
        "max", description="max: during RL, ask the autoscaler for room for max_actors for the whole stage and start "
        "one more actor whenever the cluster has room (score and eval keep num_actors). wait: every pool (score, RL, "
        "eval) follows what its phase waits on: the autoscaler is asked for one more actor's room when the pool's "
        "consumer waited on it in most of the last `window` steps, and one actor is released (it finishes the work "
        "it has, then leaves) when the pool sat idle through all of them; each phase withdraws its request when it "
        "ends, so idle nodes go")
    window: int = Field(4, ge=1, description="wait: the steps (RL steps; in score and eval, batches the pool "
                        "returns) a decision looks back on; after a change the pool is watched this many steps again")
    grow_at: float = Field(0.5, gt=0, le=1, description="wait: a step waited on the pool when its consumer waited at "
                           "least this share of it (RL: the learner, wait_seconds / step_seconds; score and eval: the "
                           "driver taking the pool's results)")
    shrink_at: float = Field(0.5, gt=0, le=1, description="wait: a step found the pool idle when its actors would "
                             "have been busy at most this share of it with one actor fewer (busy share x actors / "
                             "(actors - 1))")


class RolloutResources(ActorResources):
    """The rollout/scoring service: actors that generate (score's teacher, RL, eval) and score teacher-forced, each
    running one engine; sized and placed apart from the learner, which is how collection scales apart from
    training."""

    num_actors: int = Field(1, ge=1, description="actors to start with, and the fewest to keep")
    max_actors: int | None = Field(None, ge=1, description="an elastic pool: grow up to this many, as `scale` "
                                   "says; null keeps the pool at num_actors")
    scale: PoolScaling = Field(default_factory=PoolScaling, description="how an elastic pool picks its size: "
                               "{by: max} (the default) or {by: wait, window, grow_at, shrink_at}")
    max_in_flight: int = Field(2, ge=1, description="batches queued per actor (back-pressure)")
    call_timeout_s: float = Field(900.0, gt=0, description="seconds an actor with work in flight may answer none of "
                                  "it before it counts as hung: it is killed and replaced, its batches re-run. "
                                  "Counted from its last answer, not per queued batch, so it must cover the slowest "
                                  "single batch or weight update; starting up does not count")
    engine: EngineOptions = Field(
        default_factory=VllmOptions, description="what generates and scores, and its options: {backend: vllm, ...} "
        "(the default) or {backend: transformers, dtype, max_rows}; a key the backend does not take is refused")
    colocate: bool = Field(False, description="RL generates on the learner's own ranks instead of rollout actors: "
                           "each step every rank generates its share of the prompts with the weights it holds, then "
                           "trains, so no weights are copied and no version lags (transformers: the very module "
                           "being trained; vLLM: a copy in the rank's process, reloaded in place after each update). "
                           "Generation gets every CPU (GPU) the learner has while it runs, and training waits for it. "
                           "Score and eval still use rollout actors of these resources")

    @model_validator(mode="after")
    def _max_not_below_min(self) -> RolloutResources:
        if self.max_actors is not None and self.max_actors < self.num_actors:
            raise ValueError(f"max_actors={self.max_actors} is below num_actors={self.num_actors}")
        if self.scale.by == "wait" and self.max_actors is None:
            raise ValueError("scale.by=wait sizes an elastic pool: set max_actors (the most actors it may grow to)")
        return self


class RewardResources(ActorResources):
    """The reward pool: actors that each hold every model of task.reward_models and score batches of samples;
    placed like the rollout actors, apart from them and from the learner."""

    num_actors: int = Field(1, ge=1, description="reward actors; a lost one is replaced and its batches scored again")
    max_in_flight: int = Field(2, ge=1, description="batches queued per actor (back-pressure)")
    call_timeout_s: float = Field(900.0, gt=0, description="seconds an actor with work in flight may answer none of "
                                  "it before it counts as hung: it is killed and replaced, its batches re-run (a "
                                  "slow batch within it gets 0 by the reward model's row_timeout_s instead)")


class LearnerResources(ActorResources):
    """The DeepSpeed learner: data-parallel ranks, one Ray actor each, placed together in one placement group."""

    num_ranks: int = Field(1, ge=1, description="data-parallel ranks; each trains on its contiguous shard of every "
                           "batch, so a batch needs at least this many rows (x the objective's minibatches)")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage: 0 replicates everything; 1 "
                                            "partitions optimizer states, 2 also gradients, 3 also parameters "
                                            "(gathered per layer in each forward)")
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
    """Where each role runs and how many of it. These settings change how and where a run goes, not what it
    produces, so a run folder may be resumed with other resources."""

    rollout: RolloutResources = Field(default_factory=RolloutResources, description="the rollout/scoring actors")
    learner: LearnerResources = Field(default_factory=LearnerResources, description="the learner's ranks")
    reference: ActorResources = Field(default_factory=ActorResources, description="the reference actor: a frozen "
                                      "model scoring teacher-forced (RL's KL reference, PEAR's frozen target, "
                                      "on-policy distillation's teacher)")
    reward: RewardResources = Field(default_factory=RewardResources, description="the reward actors, started "
                                    "when task.reward_models is set")
