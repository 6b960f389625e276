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

(design notes: docs/design.md)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
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
from pear_ray.tracking import MetricsLogger, read_metrics, results_from_metrics, write_report

log = logging.getLogger(__name__)
STATE_FILE = "state.json"


# Settings that change how or where a run goes, not what it produces: a rerun into a run folder may change them
# (adding a stage to `stages` resumes the run). Every other key of the resolved config binds the folder.
NOT_BINDING = ("loggers", "resources", "parallel_cells", "output_dir", "stages")


def binding(job: JobConfig) -> dict:
    """The part of a resolved config that a run folder's results depend on."""
    return job.model_dump(mode="json", exclude=set(NOT_BINDING))


def fingerprint(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def check_bound(job: JobConfig, run_dir: Path) -> None:
    """Refuse a job whose results would differ from those already in `run_dir` (ConfigError naming each change)."""
    path = run_dir / STATE_FILE
    if not path.is_file():
        return  # a new folder: nothing to compare with
    recorded = json.loads(path.read_text()).get("config")
    if recorded is None:
        raise ConfigError(f"run folder {run_dir} was written by an older pear_ray (its {STATE_FILE} records no "
                          "config to check this job against): give another --run-dir, or add --fresh to move it "
                          "aside and start anew")
    if fingerprint(recorded) == fingerprint(binding(job)):
        return
    old, new = _flatten(recorded), _flatten(binding(job))
    unset = "(unset)"
    changes = [f"  {key}: {json.dumps(old.get(key, unset))} -> {json.dumps(new.get(key, unset))}"
               for key in sorted(old.keys() | new.keys()) if old.get(key, unset) != new.get(key, unset)]
    raise ConfigError("\n".join([
        f"run folder {run_dir} holds the results of another config; changed since:", *changes,
        "rerun with the old settings to resume it, give another --run-dir, or add --fresh to move the folder "
        "aside (to a sibling named with the time) and start anew"]))


def finished_stages(run_dir: Path) -> dict[str, str]:
    """The stages a run folder records as finished, and what each produced (nothing for a new folder)."""
    path = run_dir / STATE_FILE
    return json.loads(path.read_text())["done"] if path.is_file() else {}


def _flatten(tree: dict, prefix: str = "") -> dict:
    """A nested config as dotted key -> value."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def set_aside(run_dir: Path) -> Path | None:
    """Move a run folder to a sibling named with the time (for --fresh: nothing is deleted); returns where."""
    if not run_dir.exists():
        return None
    aside = run_dir.with_name(f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    while aside.exists():
        aside = aside.with_name(aside.name + "-1")
    run_dir.rename(aside)
    log.info("moved the run folder %s aside to %s", run_dir, aside)
    return aside


class RunState:
    """Which stages of a run folder have finished and what each produced (a path relative to the folder), under
    the config the folder is bound to."""

    def __init__(self, run_dir: Path, job: JobConfig):
        check_bound(job, run_dir)
        self.dir, self.path, self.config = run_dir, run_dir / STATE_FILE, binding(job)
        self.max_restarts = job.resources.learner.max_restarts
        self.done = finished_stages(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.save()  # bound from the start: a run killed before its first stage has partial outputs too

    def once(self, key: str, stage: Callable[[], Path | dict]) -> str:
        """Run `stage` unless it finished before; record its output."""
        if key in self.done:
            log.info("%s: done in an earlier run, skipping", key)
            return self.done[key]
        log.info("%s: starting", key)
        result = self._with_restarts(key, stage)
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
        """Where a finished stage's file or folder is (recorded relative to the run folder)."""
        return self.dir / self.done[key]

    def save(self) -> None:
        atomic.write_text(self.path, json.dumps({"fingerprint": fingerprint(self.config), "config": self.config,
                                                 "done": self.done}, indent=1))


def prepare_student(run: Run, state: RunState, prior_dir: Path | None = None) -> None:
    """Point `run.student` at the model SFT starts from: the given or built model, or that model after its prior
    (trained once into `prior_dir`, default the run's models/student-prior; cells of an experiment that differ
    only in later stages share one)."""
    if run.job.models.student.prior is not None:
        base = run.student
        run.student = state.output("prior", lambda: train_prior(run, base, prior_dir))


def run_job(job: JobConfig, run_dir: Path, prior_dir: Path | None = None) -> Path:
    """Run the job's stages into `run_dir`; returns the report's path."""
    state = RunState(run_dir, job)  # refuses another config's folder before anything starts
    if threading.current_thread() is threading.main_thread():  # not so in a Ray task driving an experiment's cell
        signal.signal(signal.SIGTERM, _exit_cleanly)  # a killed run still shuts its actors down
    dump_job(job, run_dir / "config.yaml")
    init_ray(log_dir=run_dir / "logs", use_gpu=job.uses_gpu)
    student = resolve_model(job.models.student, run_dir / "models" / "student")
    stages = set(job.stages)
    with MetricsLogger(run_dir, resume=True, loggers=job.loggers, run_name=job.name,
                       config=job.model_dump(mode="json")) as metrics:
        run = Run(job, run_dir, metrics, student)
        prepare_student(run, state, prior_dir)
        data = state.output("score", lambda: run_score(run)) if "score" in stages else run.data("sft")
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
    results = results_from_metrics(read_metrics(run_dir))
    extra = {"student": job.models.student.model_dump(exclude_none=True), "task": job.task.title,
             "eval": f"n={job.eval.n} samples per prompt, k={job.eval.k}"}
    return write_report(run_dir, results, seed=job.seed, job_name=job.name, extra=extra)


def _exit_cleanly(signum, frame) -> None:
    raise SystemExit(128 + signum)
