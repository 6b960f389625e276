"""Preflight: everything a job names, checked before anything starts (no Ray, no actor, no run folder written).

`config`, `run`, every stage command, `inspect` and `submit` call `preflight` first, so a bad job costs seconds and
one message instead of a traceback after Ray has started and models were built. It checks, in order: the run
folder (a folder, writable, not bound to another config; in a bucket: the store reachable, the bucket there, access
granted, read without writing anything), the loggers, every model the job names (a complete
Hugging Face folder or Hub id: config, weights, a tokenizer the embedding covers, positions for the prompt and
response limits; all sharing the student's tokenizer; the student's LoRA target modules among its modules), the
task (its name and args, its prompt files), the reward models' folders (complete, and of their kind), and the SFT
data (readable, valid against the schema and the student's tokenizer, every row within the model's positions), with
a behaviour model for the score stage where the data lacks what it needs. What the config alone decides (plug-ins
importable included) was checked by its validators when the job loaded; each rule is checked in one place.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

from pear_ray.config import ConfigError, JobConfig, ModelSource
from pear_ray.data import schema
from pear_ray.data.io import load_sft_data
from pear_ray.driver.run import check_bound, finished_stages, run_folder
from pear_ray.engines.lora import adaptable_modules, missing_targets
from pear_ray.hub import hub_snapshot
from pear_ray.messages import first_line
from pear_ray.models import TinyModelSpec, build_tiny_model, check_model_files
from pear_ray.rewards import folder_kind_problem
from pear_ray.tasks import make_task
from pear_ray.tracking.metrics import require_logger

log = logging.getLogger(__name__)

ROLES = ("student", "behavior", "reference")


@dataclass
class ModelFacts:
    """What the checks need of a model: its tokenizer, the rows of its input embedding and its positions (None
    when not known before the run downloads it)."""

    key: str  # the config key that names it, for messages
    tokenizer: Any
    vocab_size: int | None = None
    max_positions: int | None = None
    config: Any = None  # its Hugging Face config, for the modules LoRA adapts


def preflight(job: JobConfig, run_dir: str | Path | None, *, fresh: bool = False) -> None:
    """Raise a ConfigError (bad input: exit status 2) naming what is wrong and where. `run_dir` None skips the run
    folder (a job for a cluster); `fresh`, its binding to a config (--fresh moves it aside)."""
    if run_dir is not None:
        check_run_folder(job, run_dir, bound=not fresh)
    for name in job.loggers:
        require_logger(name)  # a LoggerNotInstalledError is bad input too
    models = {role: model_facts(getattr(job.models, role), f"models.{role}") for role in ROLES
              if getattr(job.models, role) is not None and getattr(job.models, role).scripted is None}
    check_models(job, models)
    check_lora(job, models["student"])
    check_task(job)
    check_reward_models(job)
    check_data(job, models)


def check_run_folder(job: JobConfig, run_dir: str | Path, *, bound: bool = True) -> None:
    """A folder (or none yet) somewhere writable, or in a bucket that answers, holding no other config's results
    (with `bound`)."""
    folder = run_folder(run_dir)  # a malformed URL, or one holding credentials, is refused here
    if folder.remote is None:
        check_local_folder(Path(run_dir))
    elif (problem := folder.problem()) is not None:
        raise ConfigError(f"run folder {folder.location}: {problem}")
    if bound:
        check_bound(job, folder)
    if "sft" in job.stages and "score" not in job.stages and "score" not in finished_stages(folder):
        raise ConfigError(f"the sft stage trains on the SFT data the score stage writes into the run folder "
                          f"{run_dir}, which has none: run the score stage first (pear-ray score, or pear-ray run)")


def check_local_folder(run_dir: Path) -> None:
    """A folder, or none yet, somewhere writable."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run folder {run_dir}: a file is in the way (give --run-dir another path)")
    existing = next(parent for parent in (run_dir, *run_dir.absolute().parents) if parent.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run folder {run_dir}: cannot write into {existing}")


def model_facts(source: ModelSource, key: str, what: str | None = None) -> ModelFacts:
    """A model source checked complete, without building anything the run keeps: a tiny spec is built into a
    temporary folder, a Hub id not in the cache is only confirmed (its tokenizer fetched, its weights left to the
    run). `key` names the source in messages (`what`, default `<key>.path = <path>`, names its path)."""
    if source.tiny is not None:
        return replace(_tiny_facts(source.tiny.model_dump_json()), key=key)
    what = what or f"{key}.path = {source.path!r}"
    folder = Path(source.path).expanduser()
    if not folder.is_dir():
        folder = hub_snapshot(source.path, what=what, revision=source.revision, download=False)
        if folder is None:
            from transformers import AutoTokenizer

            log.info("%s: on the Hub, not cached yet; its files are checked as the run downloads them", what)
            return ModelFacts(key, AutoTokenizer.from_pretrained(source.path, revision=source.revision))
    return read_model_folder(folder, what)


@cache
def _tiny_facts(spec_json: str) -> ModelFacts:
    """A tiny spec's facts, built once per process (several roles often share a spec's shape)."""
    with tempfile.TemporaryDirectory(prefix="pear-ray-preflight-") as folder:
        return read_model_folder(build_tiny_model(TinyModelSpec.model_validate_json(spec_json), folder),
                                 "a tiny model")


def read_model_folder(folder: Path, key: str) -> ModelFacts:
    """A Hugging Face model folder with a config, readable weights and a tokenizer whose ids the embedding covers."""
    from transformers import AutoConfig, AutoTokenizer

    where = f"{key} ({folder})" if str(folder) not in key else key
    check_model_files(folder, where)  # an IncompleteModel is bad input too
    try:
        config = AutoConfig.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as error:  # noqa: BLE001 - transformers raises many kinds; the message names the cause
        raise ConfigError(f"{where}: transformers cannot load it ({type(error).__name__}: {first_line(error)})") \
            from None
    text = config.get_text_config()
    vocab_size = getattr(text, "vocab_size", None)
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ConfigError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's embedding only "
                          f"{vocab_size} rows; ids from {vocab_size} on would index past it")
    return ModelFacts(key, tokenizer, vocab_size, getattr(text, "max_position_embeddings", None), config)


def check_models(job: JobConfig, models: dict[str, ModelFacts]) -> None:
    """Every model shares the student's tokenizer (log-prob ratios compare the same token ids) and has positions
    for the longest prompt plus the longest response the job allows."""
    student = models["student"]
    longest = job.data.max_prompt_tokens + max(job.data.max_response_tokens, job.sampling.max_tokens)
    for role, facts in models.items():
        if role != "student" and facts.tokenizer.get_vocab() != student.tokenizer.get_vocab():
            raise ConfigError(f"{facts.key}: its tokenizer differs from models.student's ({len(facts.tokenizer)} vs "
                              f"{len(student.tokenizer)} tokens); the job compares their log-probs of the same "
                              "token ids, so both need one tokenizer")
        if facts.max_positions is not None and longest > facts.max_positions:
            raise ConfigError(
                f"{facts.key}: the model has {facts.max_positions} positions, but data.max_prompt_tokens "
                f"({job.data.max_prompt_tokens}) + the longest response (data.max_response_tokens "
                f"{job.data.max_response_tokens}, sampling.max_tokens {job.sampling.max_tokens}) is {longest}; "
                "lower them")


def check_lora(job: JobConfig, student: ModelFacts) -> None:
    """models.student.lora's target modules are modules of the student that peft can adapt (peft would only say so
    once the learner starts). A Hub model not downloaded yet is checked when the learner wraps it."""
    lora = job.models.student.lora
    if lora is None or student.config is None:
        return
    adaptable = adaptable_modules(student.config)
    missing = missing_targets(adaptable, lora.target_modules)
    if missing:
        names = sorted({name.rpartition(".")[2] for name in adaptable})
        raise ConfigError(f"models.student.lora.target_modules: {missing} match no linear, embedding or convolution "
                          f"module of {student.key}; its modules of those kinds are named {names}")


def check_task(job: JobConfig) -> None:
    """The task builds (name, args), and its environment (args) when it has one, and its prompts can be drawn (files
    read). Its custom reward and a custom objective were imported when the job loaded (the config's validators)."""
    task = make_task(job.task, job.data, seed=job.task.split_seed)
    if job.task.environment is not None:
        task.environment()
    stages = set(job.stages)
    if stages & {"rl", "eval"} or ("score" in stages and job.data.sft is None):
        task.prompts("train")
        task.prompts("eval")


def check_reward_models(job: JobConfig) -> None:
    """Every folder of task.reward_models is complete and of its kind: a classifier with one label and its head in
    the weights, a causal LM judge. A tiny spec is built right; a Hub id not downloaded yet is checked for
    completeness as the other models are, and loaded by its kind when the pool starts."""
    for index, config in enumerate(job.task.reward_models):
        if config.path is None:
            continue
        what = f"task.reward_models.{index}.path = {config.path!r} ({config.kind} {config.name!r})"
        model_facts(config.model, f"task.reward_models.{index}", what)
        folder = Path(config.path).expanduser()
        if not folder.is_dir():
            folder = hub_snapshot(config.path, what=what, revision=config.revision, download=False)
        if folder is not None and (problem := folder_kind_problem(folder, config.kind)) is not None:
            raise ConfigError(f"{what}: {problem}")


def check_data(job: JobConfig, models: dict[str, ModelFacts]) -> None:
    """The data the score stage reads, valid and within the models' positions, and a source of what it lacks
    (behaviour log-probs, with score.teacher_topk the teacher's top-k); or, without a score stage, its output already
    in the run folder (checked by the stages)."""
    if "score" not in job.stages:
        return
    behavior = job.models.behavior
    if job.data.sft is None:
        if behavior is None:
            raise ConfigError("the score stage writes the SFT data with the behaviour model when there is no "
                              "data.sft: give models.behavior (a path, tiny spec or scripted policy) or data.sft")
    else:
        data = load_sft_data(job.data.sft, models["student"].tokenizer, max_prompt_tokens=job.data.max_prompt_tokens,
                             max_response_tokens=job.data.max_response_tokens, split=job.data.sft_split,
                             columns=job.data.sft_columns)
        lacks_logprobs = schema.BEHAVIOR_LOGPROBS not in data.column_names
        lacks_topk = job.score.teacher_topk > 0 and schema.TEACHER_TOPK not in data.column_names
        if lacks_logprobs and behavior is None:
            raise ConfigError(f"data.sft = {job.data.sft!r} has no {schema.BEHAVIOR_LOGPROBS} column: give "
                              "models.behavior to score it, or data that carries them")
        if lacks_topk and behavior is None:
            raise ConfigError(f"score.teacher_topk={job.score.teacher_topk} needs the teacher's top-k at every "
                              f"response token, and {job.data.sft} has behaviour log-probs but no teacher_topk "
                              "column: give models.behavior to score it, data with a teacher_topk column, or "
                              "score.teacher_topk=0")
        check_positions(data, models["student"], job.data.sft)
        if lacks_logprobs or lacks_topk:  # the behaviour model scores it; vLLM with room for one more token
            check_positions(data, models["behavior"], job.data.sft, spare=1)
    if job.score.teacher_data is not None and job.score.teacher_sft_steps:
        check_positions(load_sft_data(job.score.teacher_data, models["student"].tokenizer,
                                      max_prompt_tokens=job.data.max_prompt_tokens,
                                      max_response_tokens=job.data.max_response_tokens),
                        models.get("behavior", models["student"]), job.score.teacher_data)


def check_positions(table, facts: ModelFacts, source: str, spare: int = 0) -> None:
    """Every row's prompt + response fits the model's positions (less `spare`); names the first (1-based) row
    that does not."""
    if facts.max_positions is None:
        return
    import pyarrow.compute as pc

    lengths = (pc.list_value_length(table.column(schema.PROMPT_IDS)).to_numpy()
               + pc.list_value_length(table.column(schema.RESPONSE_IDS)).to_numpy())
    limit = facts.max_positions - spare
    too_long = (lengths > limit).nonzero()[0]
    if too_long.size:
        row = int(too_long[0])
        raise ConfigError(f"{source}, row {row + 1}: {lengths[row]} prompt + response tokens, more than the "
                          f"{limit} that {facts.key} takes ({too_long.size} of {len(lengths)} rows are too long); "
                          "lower data.max_prompt_tokens or data.max_response_tokens, which cut them")
