"""The typed job config: one YAML file under jobs/, plus dotted overrides from the command line.

Every section forbids unknown keys, so a typo is refused with the key's full dotted path instead of
being silently ignored. `load_job(path, overrides)` is the only entry point the CLI and the driver use.

  base.py       the section base class and ConfigError
  models.py     student, behaviour, reference
  data.py       task, data files, sampling
  optimizer.py  AdamW and its schedule, one section type for every trained model
  stages.py     score, sft, rl, eval
  resources.py  rollout (and its engine's options), learner, reference and reward actors
  rewards.py    reward models: a classifier or an LLM judge, beside the verifier
  job.py        the job, and the rules across sections
  loading.py    YAML + overrides -> JobConfig
  reference.py  docs/config.md, every key described, generated from the schema (pear-ray config --reference)
"""

from pear_ray.config.base import ConfigError, Section
from pear_ray.config.data import DataConfig, EnvironmentConfig, SamplingConfig, TaskConfig
from pear_ray.config.job import JobConfig, Stage
from pear_ray.config.loading import apply_override, dump_job, load_job, parse_job, set_dotted
from pear_ray.config.models import LoraConfig, ModelsConfig, ModelSource, PriorConfig, ScriptedPolicy
from pear_ray.config.optimizer import OptimizerConfig
from pear_ray.config.resources import (
    ActorResources,
    EngineOptions,
    LearnerResources,
    PoolScaling,
    ResourcesConfig,
    RewardResources,
    RolloutResources,
    TransformersOptions,
    VllmOptions,
    serving_adapters,
)
from pear_ray.config.rewards import ClassifierReward, JudgeReward, RewardModelConfig
from pear_ray.config.stages import EvalConfig, RlConfig, ScoreConfig, SftConfig, SftVariant, parse_variant

__all__ = [
    "ActorResources", "ClassifierReward", "ConfigError", "DataConfig", "EngineOptions", "EnvironmentConfig",
    "EvalConfig", "JobConfig", "JudgeReward", "LearnerResources", "LoraConfig", "ModelSource", "ModelsConfig",
    "OptimizerConfig", "PoolScaling", "PriorConfig", "ResourcesConfig", "RewardModelConfig", "RewardResources",
    "RlConfig", "RolloutResources", "SamplingConfig", "ScoreConfig", "ScriptedPolicy", "Section", "SftConfig",
    "SftVariant", "Stage", "TaskConfig", "TransformersOptions", "VllmOptions",
    "serving_adapters", "apply_override", "dump_job", "load_job", "parse_job",
    "parse_variant", "set_dotted",
]
