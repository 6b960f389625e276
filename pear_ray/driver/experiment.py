"""An experiment: one job over several seeds (and a small grid of config values), one resumable run folder per
cell under the job's folder, then one aggregated report with paired statistics.

    <job folder>/seed0/ ...                     a job with `seeds: [0, 1, 2]`
    <job folder>/sft.epochs=3/seed0/ ...        a job with `grid: {sft.epochs: [1, 3, 12]}` too
    <job folder>/report.md, summary.json, plots/

Every cell is an ordinary run (`run_job`): rerunning the command skips finished cells and resumes the unfinished
one. The job folder may be a URL (s3://bucket/prefix), as a run folder may: each cell publishes its own folder, the
experiment its report, summary and wall times. All cells are checked before the first starts, so a bad grid value,
or a cell folder holding another config's results, is refused up front; a job with a `gate` then reads it in every
cell before any cell's SFT (driver/gate.py). Cells run one after another by default; with `parallel_cells: N` up to
N run at once, each driven by a Ray task (on a cluster their actors spread over the nodes, as Ray places them).

Cells that start from one student prior share it (`<job folder>/priors/`): the cells of one seed that differ only in
later stages, or every cell when `models.student.prior.seed` fixes the prior's seed. It is trained once, by the
first cell that needs it (before any cell starts, when cells run side by side).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pear_ray import atomic
from pear_ray.config import JobConfig, parse_job, set_dotted
from pear_ray.driver.gate import pass_gate
from pear_ray.driver.run import check_bound, prepared_student, run_job
from pear_ray.runtime import init_ray
from pear_ray.stages.prior import prior_seed
from pear_ray.storage import RunFolder, join
from pear_ray.tracking import read_metrics
from pear_ray.tracking.aggregate import aggregate, write_summary
from pear_ray.tracking.experiment_report import write_experiment_report
from pear_ray.tracking.plots import PLOTS_DIR
from pear_ray.tracking.preregistration import judge
from pear_ray.tracking.report import mean_pear_weights

log = logging.getLogger(__name__)
WALL_TIME_FILE = "wall_seconds.json"  # seconds of every invocation of the job, resumed ones included


def is_experiment(job: JobConfig) -> bool:
    return bool(job.seeds or job.grid)


def cells(job: JobConfig) -> list[tuple[str, str, JobConfig]]:
    """(grid point label, folder relative to the job's, config) of every cell, grid points outermost."""
    keys = list(job.grid)
    out = []
    for values in itertools.product(*job.grid.values()):
        point = ",".join(f"{key}={value}" for key, value in zip(keys, values))
        for seed in job.seeds or [job.seed]:
            tree = job.model_dump(mode="json") | {"seed": seed, "seeds": [], "grid": {}}
            for key, value in zip(keys, values):
                set_dotted(tree, key, value)
            folder = f"{point}/seed{seed}" if point else f"seed{seed}"
            out.append((point, folder, parse_job(tree, f"{job.name}, cell {folder}")))
    return out


def add_wall_time(job_dir: Path, seconds: float) -> float:
    """Record one invocation's wall time (a failed or resumed one counts too); returns the total so far."""
    path = job_dir / WALL_TIME_FILE
    invocations = json.loads(path.read_text()) if path.is_file() else []
    invocations.append(round(seconds, 1))
    atomic.write_text(path, json.dumps(invocations))
    return sum(invocations)


def prior_key(job: JobConfig) -> str:
    """What a student's prior depends on (the student, the task, the prior's seed), as a folder name: grid cells
    that change only SFT or RL settings share their seed's prior instead of training it again, and with
    models.student.prior.seed set every cell shares one."""
    seed = prior_seed(job)
    inputs = json.dumps([job.models.student.model_dump(mode="json"), job.task.model_dump(mode="json"), seed],
                        sort_keys=True)
    return f"seed{seed}-{hashlib.sha256(inputs.encode()).hexdigest()[:12]}"


def prior_dirs(job_folder: RunFolder, planned: list[tuple[str, str, JobConfig]]) -> dict[str, Path | None]:
    """Each cell's (by folder) shared prior under the job folder's priors/, None for a student without a prior."""
    return {folder: job_folder.local / "priors" / prior_key(cell_job)
            if cell_job.models.student.prior is not None else None for _, folder, cell_job in planned}


def run_experiment(job: JobConfig, job_dir: str | Path) -> Path:
    """Run every cell into `job_dir` (a path or URL), then write the aggregated report; returns its path (in the
    local copy)."""
    started = time.perf_counter()
    planned = cells(job)  # every cell's config is valid before anything starts
    for _, folder, cell_job in planned:
        check_bound(cell_job, join(job_dir, folder))
    job_folder = RunFolder(job_dir)
    job_folder.fetch(job_folder.local / WALL_TIME_FILE)
    init_ray(log_dir=job_folder.local / "logs", use_gpu=job.uses_gpu)
    priors = prior_dirs(job_folder, planned)
    try:
        if job.gate is not None:  # every cell's, before any cell's SFT
            runs = {folder: (join(job_dir, folder), cell_job, priors[folder]) for _, folder, cell_job in planned}
            pass_gate(job, runs, job_folder)
        if job.parallel_cells > 1:
            train_shared_priors(planned, job_dir, priors)
            run_side_by_side(planned, job_dir, job.parallel_cells, priors)
        else:
            for index, (_, folder, cell_job) in enumerate(planned):
                log.info("experiment %s: cell %d of %d (%s)", job.name, index + 1, len(planned), folder)
                run_job(cell_job, join(job_dir, folder), prior_dir=priors[folder])
    finally:
        wall_seconds = add_wall_time(job_folder.local, time.perf_counter() - started)
        job_folder.publish(job_folder.local / WALL_TIME_FILE)
    per_prompt, weights = collect(job_folder, planned)
    baseline = job.primary.baseline if job.primary is not None else "none"
    summary = aggregate(per_prompt, job.eval.k, baseline=baseline, mean_weights=weights)
    primary = judge(job.primary, summary) if job.primary is not None else None
    if primary is not None:
        log.info("primary comparison: %s", primary.line)
    summary_path = write_summary(job_folder.local, summary, None if primary is None else primary.as_json())
    report = write_experiment_report(
        job_folder.local, summary, job_name=job.name, seeds=job.seeds or [job.seed],
        cells=[point for point in dict.fromkeys(point for point, _, _ in planned) if point],
        extra={"task": job.task.title,
               "eval": f"{job.task.num_eval} held-out prompts, n={job.eval.n} samples each, k={job.eval.k}",
               "variants": ", ".join(job.sft_variants)},
        wall_seconds=wall_seconds, primary=primary)
    job_folder.publish(summary_path, job_folder.local / PLOTS_DIR, report)
    return report


def train_shared_priors(planned: list[tuple[str, str, JobConfig]], job_dir: str | Path,
                        priors: dict[str, Path | None]) -> None:
    """Train every prior that several cells start from, once, in the first such cell's folder, before cells run
    side by side: two cells must not write one prior folder at the same time."""
    starts = Counter(priors.values())
    trained = set()
    for _, folder, cell_job in planned:
        prior = priors[folder]
        if prior is not None and starts[prior] > 1 and prior not in trained:
            log.info("experiment: training the prior %s, shared by %d cells", prior.name, starts[prior])
            prepared_student(cell_job, join(job_dir, folder), prior)
            trained.add(prior)


@ray.remote(num_cpus=0)
def _run_cell(cell_job: JobConfig, run_dir: str, prior_dir: Path | None) -> str:
    return str(run_job(cell_job, run_dir, prior_dir))


def run_side_by_side(planned: list[tuple[str, str, JobConfig]], job_dir: str | Path, at_once: int,
                     priors: dict[str, Path | None]) -> None:
    """Up to `at_once` cells at a time, each driven by a Ray task pinned to this node (so every run folder lands
    where a sequential run would put it), each cell's actors placed by Ray wherever the cluster has room. Each cell
    starts from its prior in `priors` (see train_shared_priors)."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    waiting, running = list(planned), {}
    while waiting or running:
        while waiting and len(running) < at_once:
            _, folder, cell_job = waiting.pop(0)
            log.info("experiment: starting cell %s (%d running)", folder, len(running) + 1)
            cell = _run_cell.options(scheduling_strategy=here).remote(cell_job, join(job_dir, folder), priors[folder])
            running[cell] = folder
        [done], _ = ray.wait(list(running), num_returns=1)
        log.info("experiment: cell %s finished", running.pop(done))
        ray.get(done)  # a failed cell fails the experiment here, with its own error


def collect(job_folder: RunFolder, planned: list[tuple[str, str, JobConfig]]) -> tuple[pa.Table, dict]:
    """Every cell's per-prompt eval results (with its grid point as `cell`), and each (cell, variant)'s mean PEAR
    weight over its SFT steps (both fetched into the local copy first, for a job folder in a bucket)."""
    tables, weights = [], {}
    for point, folder, _ in planned:
        cell = job_folder.local / folder
        job_folder.fetch(cell / "eval")
        for path in sorted((cell / "eval").glob("*.parquet")):
            table = pq.read_table(path)
            tables.append(table.append_column("cell", pa.array([point] * table.num_rows)))
        for variant, weight in mean_pear_weights(read_metrics(cell)).items():
            weights.setdefault((point, variant), []).append(weight)
    if not tables:
        raise RuntimeError(f"{job_folder.location}: no cell wrote per-prompt eval results (does the job have an eval "
                           "stage?)")
    per_prompt = pa.concat_tables(tables, promote_options="default")  # an older eval wrote no style counts
    return per_prompt, {key: float(np.mean(values)) for key, values in weights.items()}
