"""What the stages share: the run folder's layout, prompt tables, rollouts with rewards."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
from tqdm import tqdm
from transformers import AutoTokenizer

from pear_ray.actors.pool import ActorPool
from pear_ray.actors.reward import RewardModels
from pear_ray.config import JobConfig
from pear_ray.data import schema
from pear_ray.data.io import encode_prompt
from pear_ray.engines.checkpoints import usable_tag
from pear_ray.environments.base import ENV_ERROR, ENV_TIMEOUT
from pear_ray.models import resolve_model
from pear_ray.rewards import resolve_reward_model
from pear_ray.storage import RunFolder
from pear_ray.tasks import make_task
from pear_ray.tasks.base import task_styles
from pear_ray.tasks.build import EpisodicTask
from pear_ray.tasks.verify import score_rows
from pear_ray.tracking import MetricsLogger
from pear_ray.tracking.metrics import style_share

log = logging.getLogger(__name__)


ENVIRONMENT_FAILURES = ("env_errors", "env_timeouts")  # the failure counts (and metrics) of environments
BAR_PIECE_PROMPTS = 16  # prompts per generation request when a progress bar shows them


@dataclass
class Run:
    """One job in its run folder: where each stage reads and writes. `dir` is the folder's local copy; `folder`
    says where it lives (a path, or a bucket the driver publishes to and fetches from: pear_ray/storage.py)."""

    job: JobConfig
    dir: Path
    metrics: MetricsLogger
    student: Path  # the student base model folder
    folder: RunFolder | None = None  # default: the local folder `dir`

    def __post_init__(self):
        if self.folder is None:
            self.folder = RunFolder(self.dir)

    def model(self, name: str) -> Path:
        return self.dir / "models" / name

    def checkpoints(self, name: str) -> str:
        """Where training `name` checkpoints: a folder, or its URL (each learner rank then writes to its node's copy
        and uploads what it wrote)."""
        return self.folder.where(self.dir / "checkpoints" / name)

    def data(self, name: str) -> Path:
        return self.dir / "data" / f"{name}.parquet"

    def per_prompt(self, after: str, variant: str) -> Path:
        """Per-prompt eval results of a variant after stage `after`."""
        return self.dir / "eval" / f"{after}-{variant}.parquet"

    def shared(self, path: Path) -> str:
        """Where a process on any node finds `path` of this node's copy (a model folder, a data file): the path
        itself, or, for a run folder in a bucket, its URL once what changed under it is uploaded (the actor fetches
        it: storage.materialize). A path outside the bucket's copy (a model given by path) is passed as it is."""
        if self.folder.remote is None or not Path(path).absolute().is_relative_to(self.folder.root.absolute()):
            return str(path)
        self.folder.publish(path)
        return self.folder.where(path)

    def fetched(self, path: Path) -> Path:
        """`path`, fetched into the local copy first if the run folder lives in a bucket that has it (an earlier
        run's, on another machine)."""
        self.folder.fetch(path)
        return path

    def reference(self, default: Path) -> Path:
        """The frozen reference model (RL's KL term, PEAR's frozen target): models.reference when the job gives one,
        else `default` (the RL start model, the student before SFT)."""
        if self.job.models.reference is None:
            return default
        return resolve_model(self.job.models.reference, self.fetched(self.model("reference")))

    def behavior(self) -> Path:
        """The behaviour model's folder (given, or built once)."""
        if self.job.models.behavior is None or self.job.models.behavior.scripted is not None:
            raise ValueError("this needs a behaviour model: give models.behavior as a path or a tiny spec (data.sft "
                             "with a behavior_logprobs column needs none for SFT)")
        return resolve_model(self.job.models.behavior, self.fetched(self.model("behavior")))

    @property
    def teacher_dir(self) -> Path:
        """Where the score stage exports the behaviour model after its brief SFT (score.teacher_sft_steps)."""
        return self.model("behavior-trained")

    def teacher(self) -> Path:
        """The model that wrote the SFT data, for distillation: the behaviour model after its brief SFT when the
        score stage gives it one."""
        if not self.job.score.teacher_sft_steps:
            return self.behavior()
        if not is_exported(self.fetched(self.teacher_dir)):
            raise FileNotFoundError(f"the trained teacher {self.teacher_dir} is not there: run the score stage first")
        return self.teacher_dir

    @cached_property
    def task(self):
        return make_task(self.job.task, self.job.data, seed=self.job.task.split_seed)

    @property
    def environment(self) -> EpisodicTask | None:
        """The task, when its samples are multi-turn episodes with an environment (task.environment), else None."""
        return self.task if isinstance(self.task, EpisodicTask) else None

    @cached_property
    def tokenizer(self):
        return AutoTokenizer.from_pretrained(self.student)


def is_exported(folder: Path) -> bool:
    """A Hugging Face folder with its weights (the learner's export moves its folder into place whole)."""
    return (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()


def resume(run: Run, learner, name: str, stage: str, variant: str | None = None) -> int:
    """Load training `name`'s last whole checkpoint, if any, and drop the metrics rows of (stage, variant) logged
    after it (all of them when training starts afresh), so every step is logged once. Returns the step to
    continue from."""
    folder = run.checkpoints(name)
    tag = usable_tag(folder)
    start = learner.load_checkpoint(folder, tag)["step"] if tag else 0
    if start:
        log.info("%s: resuming at step %d", name, start)
    run.metrics.truncate_after(stage, variant, start)
    return start


def checkpoint(run: Run, learner, name: str, step: int) -> None:
    """Checkpoint training `name` at `step`, the run folder published first: a checkpoint in a bucket always has the
    metrics rows it resumes after (a resume drops the later ones; rows missing before it would stay missing)."""
    run.folder.publish()
    learner.save_checkpoint(run.checkpoints(name), {"step": step})


def prompt_table(run: Run, split: str, n: int | None = None) -> pa.Table:
    """The task's prompts of a split (`n` of them, default the config's count), tokenized the one way every stage
    tokenizes."""
    prompts = run.task.prompts(split, n)
    tokenizer = run.tokenizer
    ids = [encode_prompt(tokenizer, text)[-run.job.data.max_prompt_tokens:]
           for text in prompts.column(schema.PROMPT).to_pylist()]
    return schema.append_column(prompts, schema.PROMPT_IDS, ids)


def sampling_call(environment: EpisodicTask | None) -> tuple[str, dict]:
    """The rollout actors' method that samples, and its arguments beyond the sampling settings: multi-turn episodes
    with the environment (`Run.environment`), or one answer per sample."""
    return ("generate", {}) if environment is None else ("episodes", {"environment": environment})


def rollouts(pool: ActorPool, prompts: pa.Table, *, n: int, seed: int, environment: EpisodicTask | None = None,
             desc: str | None = None, on_piece: Callable[[pa.Table], dict[str, str]] | None = None,
             **sampling) -> pa.Table:
    """n samples per prompt from the pool (episodes with `environment` when given), the prompts split evenly over its
    actors, rows in prompt order;
    a prompt's samples share its group id (its row number unless the table has group ids). With `desc`, a progress
    bar of the prompts done, the prompts cut into pieces of at most BAR_PIECE_PROMPTS so it moves (each prompt has
    its own seed, so the samples do not depend on the cut); `on_piece` sees each piece's samples as they arrive and
    returns figures for the bar (eval's running pass@k)."""
    pieces, chunk = rollout_pieces(pool, prompts, BAR_PIECE_PROMPTS if desc is not None else None)
    done = {}
    with tqdm(total=prompts.num_rows, desc=desc, unit="prompt", disable=desc is None) as progress:
        method, arguments = sampling_call(environment)
        for index, ref, _ in pool.map(method, pieces, n=n, seed=seed, **arguments, **sampling):
            done[index] = ref
            if on_piece is not None:
                progress.set_postfix(on_piece(ray.get(ref)), refresh=False)
            progress.update(min(chunk, prompts.num_rows - index * chunk))
    return pa.concat_tables(ray.get([done[i] for i in range(len(pieces))]))


def rollout_pieces(pool: ActorPool, prompts: pa.Table, max_chunk: int | None = None
                   ) -> tuple[list[ray.ObjectRef], int]:
    """The prompts (with group ids: their row numbers unless given) cut into one piece per actor (at most
    `max_chunk` prompts each), put in the object store; and the piece size."""
    if schema.GROUP_ID not in prompts.column_names:
        prompts = schema.append_column(prompts, schema.GROUP_ID, np.arange(prompts.num_rows))
    chunk = -(-prompts.num_rows // len(pool.actors))
    if max_chunk is not None:
        chunk = min(chunk, max_chunk)
    return [ray.put(prompts.slice(start, chunk)) for start in range(0, prompts.num_rows, chunk)], chunk


def with_rewards(run: Run, table: pa.Table, reward_models: RewardModels | None = None
                 ) -> tuple[pa.Table, dict[str, int]]:
    """Decode the responses and score them with the task's verifier (in Ray tasks, with a timeout), and with the
    reward models when given (start_reward_models)."""
    return decoded_rewards(table, run.tokenizer, run.task, run.job.task, reward_models)


def decoded_rewards(table: pa.Table, tokenizer, task, task_config, reward_models: RewardModels | None = None
                    ) -> tuple[pa.Table, dict[str, int]]:
    """`with_rewards` without a Run, for a Ray task next to the samples. The verifier's reward is `reward`; each
    reward model's score is `reward_<name>`, its counts (errors, timeouts, unparsed) beside the verifier's. Episodes
    come rewarded by their environment, as they were played: that reward stands in for the verifier's (no verifier
    runs again), and the environment's failures are counted."""
    texts = tokenizer.batch_decode(table.column(schema.RESPONSE_IDS).to_pylist(), skip_special_tokens=True)
    table = schema.append_column(table, schema.RESPONSE, texts)
    if isinstance(task, EpisodicTask):
        failures = environment_failures(table)
    else:
        rewards, failures = score_rows(table, task_config, task=task)
        table = schema.append_column(table, schema.REWARD, rewards)
    if reward_models is not None:
        table, counts = reward_models.add_scores(table)
        failures = failures | counts
    return table, failures


def start_reward_models(run: Run) -> RewardModels | None:
    """The reward pool for task.reward_models (None when it has none): each model's folder given, or a tiny one
    built once into models/reward-<name>."""
    models = run.job.task.reward_models
    if not models:
        return None
    folders = {model.name: run.shared(resolve_reward_model(model, run.fetched(run.model(f"reward-{model.name}"))))
               for model in models}
    return RewardModels.start(folders, models, run.job.resources.reward)


def environment_failures(table: pa.Table) -> dict[str, int]:
    """Episodes an environment ended by raising or hanging (their reward is 0), as verifier failures are counted."""
    reasons = table.column(schema.FINISH_REASON).to_numpy(zero_copy_only=False)
    return {"errors": 0, "timeouts": 0, ENVIRONMENT_FAILURES[0]: int(np.sum(reasons == ENV_ERROR)),
            ENVIRONMENT_FAILURES[1]: int(np.sum(reasons == ENV_TIMEOUT))}


def correct_mask(table: pa.Table, threshold: float) -> np.ndarray:
    """Which samples are correct: reward >= threshold, on the verifier's exact value. No slack: a partial credit a
    float ulp below full (spell_backward's 6 x 1/6 = 0.9999999999999999 for a wrong answer) is not full credit."""
    return table.column(schema.REWARD).to_numpy() >= threshold


def correct_counts(table: pa.Table, threshold: float) -> np.ndarray:
    """Correct samples per group (prompt), in group order."""
    return counts_per_group(table, correct_mask(table, threshold))


def style_counts(table: pa.Table, task) -> dict[str, np.ndarray]:
    """Samples per group (prompt), in group order, in each of the task's response styles, by the decoded `response`
    column ({} for a task without styles; a sample in none of them counts in none)."""
    styles = task_styles(task)
    found = np.array([task.style(text) for text in table.column(schema.RESPONSE).to_pylist()] if styles else [],
                     dtype=object)
    return {style: counts_per_group(table, found == style) for style in styles}


def style_shares(counts: dict[str, np.ndarray], samples: int) -> dict[str, float]:
    """The `share_<style>` metrics: the fraction of `samples` in each style, from style counts (per group or in all)."""
    return {style_share(style): float(np.sum(count)) / samples for style, count in counts.items()}


def counts_per_group(table: pa.Table, mask: np.ndarray) -> np.ndarray:
    """How many rows of each group (prompt) `mask` holds, in group order."""
    _, index = np.unique(table.column(schema.GROUP_ID).to_numpy(), return_inverse=True)
    return np.bincount(index, weights=mask).astype(int)
