"""The driver: a job's stages in order, into one run folder, resumable.

    prior  -> models/student-prior                   (tiny students with a prior only)
    score  -> data/sft.parquet                       (behaviour log-probs)
    for each SFT variant (none, token, block, sequence...):
      sft  -> models/sft-<variant>                   (PEAR-weighted, from the student)
      eval -> eval_sft metrics, eval/sft-<variant>.parquet (pass@k before RL, per-prompt counts)
      rl   -> models/rl-<variant>                    (GRPO from the SFT checkpoint)
      eval -> eval_rl metrics                        (pass@k after RL)
    report.md + plots/

A finished stage is recorded in state.json and skipped on a rerun; an unfinished one resumes from its last
checkpoint. state.json also binds the folder to the config its results came from, so a rerun with other settings
is refused instead of mixing results; paths in it are relative to the folder, so the folder can move. Bulk data
moves between actors by ObjectRef; the driver holds refs, indices and metrics.

The run folder may be a URL (s3://bucket/prefix; pear_ray/storage.py): the driver works in its local copy, publishes
what changed at every checkpoint and stage end (state.json last, so the bucket never records a stage whose outputs
it lacks), and a rerun on a machine with nothing local fetches state.json and the metrics first, then each finished
stage's output when a later stage reads it.

(design notes: docs/design.md)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pear_ray import atomic
from pear_ray.actors.learner import LearnerLost, LearnerPreempted
from pear_ray.config import ConfigError, JobConfig, dump_job
from pear_ray.models import resolve_model
from pear_ray.runtime import init_ray
from pear_ray.stages.common import Run
from pear_ray.stages.evaluate import run_eval
from pear_ray.stages.prior import train_prior
from pear_ray.stages.rl import run_rl
from pear_ray.stages.score import run_score
from pear_ray.stages.sft import run_sft
from pear_ray.storage import RunFolder
from pear_ray.tracking import MetricsLogger, read_metrics, results_from_metrics, write_report
from pear_ray.tracking.metrics import RESUMED_FILES

log = logging.getLogger(__name__)
STATE_FILE = "state.json"
# What a run folder's publishing leaves to others: checkpoints (each learner rank uploads its own), the Ray logs
# (each node's own), W&B's files (it syncs them to its server) and state.json (published last, by RunState, once
# what it records is there).
NOT_PUBLISHED = ("checkpoints", "logs", "wandb", STATE_FILE)


# Settings that change how or where a run goes, not what it produces: a rerun into a run folder may change them
# (adding a stage to `stages` resumes the run; a gate only stops a run before SFT; the primary comparison only
# reads the results). Every other key of the resolved config binds the folder.
NOT_BINDING = ("loggers", "resources", "parallel_cells", "output_dir", "stages", "gate", "primary")


def binding(job: JobConfig) -> dict:
    """The part of a resolved config that a run folder's results depend on."""
    return job.model_dump(mode="json", exclude=set(NOT_BINDING))


def fingerprint(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def run_folder(location: str | Path | RunFolder) -> RunFolder:
    """A run folder given as a path or URL (or already opened)."""
    return location if isinstance(location, RunFolder) else RunFolder(location, skip=NOT_PUBLISHED)


def recorded_state(folder: RunFolder) -> dict | None:
    """A run folder's state.json, read where the folder lives (None for a new folder)."""
    text = folder.read_text(STATE_FILE)
    return None if text is None else json.loads(text)


def check_bound(job: JobConfig, run_dir: str | Path | RunFolder) -> None:
    """Refuse a job whose results would differ from those already in `run_dir` (ConfigError naming each change)."""
    folder = run_folder(run_dir)
    state = recorded_state(folder)
    if state is None:
        return  # a new folder: nothing to compare with
    recorded = state.get("config")
    if recorded is None:
        raise ConfigError(f"run folder {folder.location} was written by an older pear_ray (its {STATE_FILE} records "
                          "no config to check this job against): give another --run-dir, or add --fresh to move it "
                          "aside and start anew")
    recorded = resolved_again(recorded)
    if fingerprint(recorded) == fingerprint(binding(job)):
        return
    old, new = _flatten(recorded), _flatten(binding(job))
    unset = "(unset)"
    changes = [f"  {key}: {json.dumps(old.get(key, unset))} -> {json.dumps(new.get(key, unset))}"
               for key in sorted(old.keys() | new.keys()) if old.get(key, unset) != new.get(key, unset)]
    raise ConfigError("\n".join([
        f"run folder {folder.location} holds the results of another config; changed since:", *changes,
        "rerun with the old settings to resume it, give another --run-dir, or add --fresh to move the folder "
        "aside (to a sibling named with the time) and start anew"]))


def resolved_again(recorded: dict) -> dict:
    """A recorded config as this pear_ray resolves it: a key added since the folder was written gets its default,
    which keeps the old behaviour (a new key's default must), so the folder is not bound to another config for it.
    A recorded config this pear_ray no longer reads (a key renamed or removed) is compared as it is."""
    try:
        return binding(JobConfig.model_validate(recorded))
    except ValueError:  # pydantic's ValidationError is one
        return recorded


def finished_stages(run_dir: str | Path | RunFolder) -> dict[str, str]:
    """The stages a run folder records as finished, and what each produced (nothing for a new folder)."""
    state = recorded_state(run_folder(run_dir))
    return state["done"] if state is not None else {}


def _flatten(tree: dict, prefix: str = "") -> dict:
    """A nested config as dotted key -> value."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def set_aside(run_dir: str | Path) -> str | None:
    """Move a run folder to a sibling named with the time (for --fresh: nothing is deleted); returns where."""
    aside = run_folder(run_dir).move_aside()
    if aside is not None:
        log.info("moved the run folder %s aside to %s", run_dir, aside)
    return aside


class RunState:
    """Which stages of a run folder have finished and what each produced (a path relative to the folder), under
    the config the folder is bound to. Opening it readies the folder's local copy (pear_ray/storage.py)."""

    def __init__(self, run_dir: str | Path | RunFolder, job: JobConfig):
        self.folder = run_folder(run_dir)
        check_bound(job, self.folder)
        self.folder.prepare(STATE_FILE, RESUMED_FILES)
        self.dir, self.config = self.folder.local, binding(job)
        self.path = self.dir / STATE_FILE
        self.max_restarts = job.resources.learner.max_restarts
        self.done = finished_stages(self.folder)
        self.save()  # bound from the start: a run killed before its first stage has partial outputs too

    def once(self, key: str, stage: Callable[[], Path | dict]) -> str:
        """Run `stage` unless it finished before; record its output, once it and all else the stage wrote is
        published."""
        if key in self.done:
            log.info("%s: done in an earlier run, skipping", key)
            return self.done[key]
        log.info("%s: starting", key)
        result = self._with_restarts(key, stage)
        if isinstance(result, Path):
            self.folder.publish(result)  # it may lie outside the folder (an experiment's shared prior)
        self.folder.publish()
        self.done[key] = os.path.relpath(result, self.dir) if isinstance(result, Path) else str(result)
        self.save()
        return self.done[key]

    def _with_restarts(self, key: str, stage: Callable[[], Path | dict]) -> Path | dict:
        """`stage()`, run again (it resumes from its last checkpoint) when a learner rank dies, up to
        resources.learner.max_restarts times, and whenever a node of the learner drains (a planned restart, on other
        nodes: a draining node gets no new work)."""
        restarts = 0
        while True:
            try:
                return stage()
            except LearnerPreempted as preempted:
                log.warning("%s: %s; starting the stage again on other nodes (not counted as a restart)", key,
                            preempted.what)
            except LearnerLost as lost:
                if restarts == self.max_restarts:
                    raise
                restarts += 1
                log.warning("%s: %s; restarting the stage from its last checkpoint (restart %d of %d)", key,
                            lost.what, restarts, self.max_restarts)

    def output(self, key: str, stage: Callable[[], Path]) -> Path:
        """`once` for a stage that writes a file or folder: where it is."""
        self.once(key, stage)
        return self.output_of(key)

    def output_of(self, key: str) -> Path:
        """Where a finished stage's file or folder is (recorded relative to the run folder), fetched into the local
        copy if it is not there."""
        path = Path(os.path.normpath(self.dir / self.done[key]))
        self.folder.fetch(path)
        return path

    def save(self) -> None:
        atomic.write_text(self.path, json.dumps({"fingerprint": fingerprint(self.config), "config": self.config,
                                                 "done": self.done}, indent=1))
        self.folder.publish(self.path)


def prepare_student(run: Run, state: RunState, prior_dir: Path | None = None) -> None:
    """Point `run.student` at the model SFT starts from: the given or built model, or that model after its prior
    (trained once into `prior_dir`, default the run's models/student-prior; cells of an experiment that differ
    only in later stages share one)."""
    if run.job.models.student.prior is not None:
        base = run.student
        prior_dir = run.fetched(prior_dir or run.model("student-prior"))  # another cell's, maybe, in a bucket
        run.student = state.output("prior", lambda: train_prior(run, base, prior_dir))


@contextmanager
def opened_run(job: JobConfig, run_dir: str | Path, prior_dir: Path | None = None) -> Iterator[tuple[Run, RunState]]:
    """A run folder's stages opened: the folder bound to the job (another config's refused before anything starts),
    its config.yaml written, Ray up, the metrics logger open, and `run.student` the model SFT starts from (the student
    after its prior, trained into `prior_dir` unless done; see `prepare_student`). `pear-ray run`, `inspect` and the
    gate all open a run folder this way, so what one records the others reuse."""
    state = RunState(run_dir, job)
    dump_job(job, state.dir / "config.yaml")
    init_ray(log_dir=state.dir / "logs", use_gpu=job.uses_gpu)
    state.folder.fetch(state.dir / "models" / "student")  # a tiny student built by an earlier run
    student = resolve_model(job.models.student, state.dir / "models" / "student")
    with MetricsLogger(state.dir, resume=True, loggers=job.loggers, run_name=job.name,
                       config=job.model_dump(mode="json")) as metrics:
        run = Run(job, state.dir, metrics, student, state.folder)
        prepare_student(run, state, prior_dir)
        yield run, state


def prepared_student(job: JobConfig, run_dir: str | Path, prior_dir: Path | None = None) -> Path:
    """The model SFT would start from, its prior trained first if need be (see `opened_run`)."""
    with opened_run(job, run_dir, prior_dir) as (run, _):
        return run.student


def run_job(job: JobConfig, run_dir: str | Path, prior_dir: Path | None = None) -> Path:
    """Run the job's stages into `run_dir` (a path or URL); returns the report's path (in the local copy)."""
    if threading.current_thread() is threading.main_thread():  # not so in a Ray task driving an experiment's cell
        signal.signal(signal.SIGTERM, _exit_cleanly)  # a killed run still shuts its actors down
    stages = set(job.stages)
    with opened_run(job, run_dir, prior_dir) as (run, state):
        if "score" in stages:
            data = state.output("score", lambda: run_score(run))
        else:  # an earlier run's, when there is one (preflight made sure of it where SFT reads it)
            data = state.output_of("score") if "score" in state.done else run.data("sft")
        for variant in job.sft_variants:
            model = run.student
            if "sft" in stages:
                model = state.output(f"sft/{variant}", lambda v=variant: run_sft(run, v, data))
                if "eval" in stages:
                    state.once(f"eval_sft/{variant}", lambda v=variant, m=model: run_eval(run, v, m, "sft"))
            if "rl" in stages:
                model = state.output(f"rl/{variant}", lambda v=variant, m=model: run_rl(run, v, m))
                if "eval" in stages:
                    state.once(f"eval_rl/{variant}", lambda v=variant, m=model: run_eval(run, v, m, "rl"))
    results = results_from_metrics(read_metrics(state.dir))
    extra = {"student": job.models.student.model_dump(exclude_none=True), "task": job.task.title,
             "eval": f"n={job.eval.n} samples per prompt, k={job.eval.k}"}
    report = write_report(state.dir, results, seed=job.seed, job_name=job.name, extra=extra,
                          location=state.folder.location if state.folder.remote else None)
    state.folder.publish()
    return report


def _exit_cleanly(signum, frame) -> None:
    raise SystemExit(128 + signum)
