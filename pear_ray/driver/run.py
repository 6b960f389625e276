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
checkpoint. Bulk data moves between actors by ObjectRef; the driver holds refs, indices and metrics.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from pear_ray.config import JobConfig, dump_job
from pear_ray.models import resolve_model
from pear_ray.runtime import init_ray
from pear_ray.stages.common import Run
from pear_ray.stages.evaluate import run_eval
from pear_ray.stages.rl import run_rl
from pear_ray.stages.score import run_score, train_prior
from pear_ray.stages.sft import run_sft
from pear_ray.tracking import MetricsLogger, read_metrics, results_from_metrics, write_report

log = logging.getLogger(__name__)
STATE_FILE = "state.json"


class RunState:
    """Which stages of a run folder have finished, and what each produced (a path)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / STATE_FILE
        self.done: dict[str, str] = json.loads(self.path.read_text())["done"] if self.path.is_file() else {}

    def once(self, key: str, stage: Callable[[], Path | dict]) -> str:
        """Run `stage` unless it finished before; record its output."""
        if key in self.done:
            log.info("%s: done in an earlier run, skipping", key)
            return self.done[key]
        log.info("%s: starting", key)
        self.done[key] = str(stage())
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps({"done": self.done}, indent=1))
        partial.replace(self.path)
        return self.done[key]


def prepare_student(run: Run, state: RunState, prior_dir: Path | None = None) -> None:
    """Point `run.student` at the model SFT starts from: the given or built model, or that model after its prior
    (trained once into `prior_dir`, default the run's models/student-prior; cells of an experiment that differ
    only in later stages share one)."""
    if run.job.models.student.prior is not None:
        base = run.student
        run.student = Path(state.once("prior", lambda: train_prior(run, base, prior_dir)))


def run_job(job: JobConfig, run_dir: Path, prior_dir: Path | None = None) -> Path:
    """Run the job's stages into `run_dir`; returns the report's path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if threading.current_thread() is threading.main_thread():  # not so in a Ray task driving an experiment's cell
        signal.signal(signal.SIGTERM, _exit_cleanly)  # a killed run still shuts its actors down
    state = RunState(run_dir)
    dump_job(job, run_dir / "config.yaml")
    init_ray(log_dir=run_dir / "logs")
    student = resolve_model(job.models.student, run_dir / "models" / "student")
    stages = set(job.stages)
    with MetricsLogger(run_dir, resume=True, loggers=job.loggers, run_name=job.name,
                       config=job.model_dump(mode="json")) as metrics:
        run = Run(job, run_dir, metrics, student)
        prepare_student(run, state, prior_dir)
        data = Path(state.once("score", lambda: run_score(run))) if "score" in stages else run.data("sft")
        for variant in job.sft_variants:
            model = run.student
            if "sft" in stages:
                model = Path(state.once(f"sft/{variant}", lambda v=variant: run_sft(run, v, data)))
                if "eval" in stages:
                    state.once(f"eval_sft/{variant}", lambda v=variant, m=model: run_eval(run, v, m, "sft"))
            if "rl" in stages:
                model = Path(state.once(f"rl/{variant}", lambda v=variant, m=model: run_rl(run, v, m)))
                if "eval" in stages:
                    state.once(f"eval_rl/{variant}", lambda v=variant, m=model: run_eval(run, v, m, "rl"))
    results = results_from_metrics(read_metrics(run_dir))
    extra = {"student": job.models.student.model_dump(exclude_none=True), "task": job.task.title,
             "eval": f"n={job.eval.n} samples per prompt, k={job.eval.k}"}
    return write_report(run_dir, results, seed=job.seed, job_name=job.name, extra=extra)


def _exit_cleanly(signum, frame) -> None:
    raise SystemExit(128 + signum)
