"""The gate before SFT (job key `gate`): a job whose PEAR variant would weight two behaviour sources' first response
token alike stops before it pays for SFT and RL.

In the two-style world the first response token is where the behaviour policy chooses a worked trace or a bare
answer; its token-level weight is the product of the later tokens' clipped ratios, so the clip decides how far PEAR
can tell the styles apart there (under seed 0's prior in jobs/pear-vs-sft.yaml: 0.64 before a trace vs 0.61 before a
bare answer with the paper's clip [-0.08, 0.3]; 0.23 vs 0.0048, 49x, with [-1, 0.3]). Each run folder is brought to
the point of SFT (its prior and score stage, recorded in its state.json and reused by the run), its data scored under
the student SFT starts from, and the ratio read with the variant's settings (driver/inspect.py's figures). Every
reading goes to gate.json in the job's folder; one below gate.min_ratio stops the job with one line saying what to
change.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pear_ray import atomic
from pear_ray.config import JobConfig
from pear_ray.driver.inspect import data_figures, first_token_ratio, scored_data
from pear_ray.driver.run import RunState, finished_stages, run_folder, run_job
from pear_ray.storage import RunFolder

log = logging.getLogger(__name__)
GATE_FILE = "gate.json"


class GateFailed(RuntimeError):
    """The job's data failed its gate: stopped before SFT, nothing trained (exit status 1)."""


def gate_reading(job: JobConfig, student: Path, data: Path) -> dict:
    """The first response token's mean weight in rows of the gate's numerator and denominator sources under
    `student`, with the gate variant's PEAR settings, their ratio, and whether it reaches gate.min_ratio."""
    gate, pear = job.gate, job.sft_objective(job.gate.variant)
    by_source = data_figures(student, data, pear, levels=[pear.level])["levels"][pear.level].get("by_source", {})
    missing = [name for name in (gate.numerator, gate.denominator) if name not in by_source]
    if missing:
        raise ValueError(f"gate: the SFT data {data} has no rows of source {missing} in its source column (sources "
                         f"found: {sorted(by_source) or 'fewer than two'})")
    ratio = first_token_ratio(by_source, gate.numerator, gate.denominator)
    return {"variant": gate.variant, "level": pear.level, "delta_clip": list(pear.delta_clip),
            "first_token_weight": {name: by_source[name]["first_token_weight"]
                                   for name in (gate.numerator, gate.denominator)},
            **ratio, "min_ratio": gate.min_ratio, "passed": ratio["ratio"] >= gate.min_ratio}


def run_gated(job: JobConfig, run_dir: str | Path) -> Path:
    """A single run (`run_job`), its gate passed first when it has one and trains; returns the report's path."""
    if job.gate is not None and "sft" in job.stages:
        pass_gate(job, {f"seed{job.seed}": (str(run_dir), job, None)}, run_folder(run_dir))
    return run_job(job, run_dir)


def pass_gate(job: JobConfig, runs: dict[str, tuple[str, JobConfig, Path | None]], folder: RunFolder) -> None:
    """Bring every run folder (name -> its location, config and shared prior folder or None) to the point of SFT
    (prior and score, recorded in its state.json for the run to reuse), read the gate in each, write the readings
    to `folder`'s gate.json and stop (GateFailed) if any fails; else record the pass in every run's state.json.
    Runs that all passed before are not read again."""
    if all("gate" in finished_stages(location) for location, _, _ in runs.values()):
        log.info("gate: passed in an earlier run")
        return
    readings = {}
    for name, (location, run_config, prior_dir) in runs.items():
        log.info("gate: reading %s", name)
        readings[name] = gate_reading(run_config, *scored_data(run_config, location, prior_dir))
    path = enforce_gate(job, readings, folder)
    for location, run_config, _ in runs.values():
        RunState(location, run_config).once("gate", lambda: path)


def enforce_gate(job: JobConfig, readings: dict[str, dict], folder: RunFolder) -> Path:
    """Log every run folder's reading (by its name), write them to the job folder's gate.json, and raise GateFailed
    if any falls below gate.min_ratio. Returns gate.json's path."""
    for name, reading in readings.items():
        weights = reading["first_token_weight"]
        log.info("gate, %s: first-token weight %s %.3g / %s %.3g = %.3g (variant %s, min %g): %s", name,
                 reading["numerator"], weights[reading["numerator"]], reading["denominator"],
                 weights[reading["denominator"]], reading["ratio"], reading["variant"], reading["min_ratio"],
                 "passed" if reading["passed"] else "FAILED")
    path = folder.local / GATE_FILE
    atomic.write_text(path, json.dumps({"gate": job.gate.model_dump(mode="json"), "readings": readings}, indent=1))
    folder.publish(path)
    failed = {name: reading for name, reading in readings.items() if not reading["passed"]}
    if failed:
        raise GateFailed(gate_failure(job, failed, folder.where(path)))
    return path


def gate_failure(job: JobConfig, failed: dict[str, dict], where: str) -> str:
    """One line: which variant, run folders and ratios failed against gate.min_ratio, and what to change."""
    gate, pear = job.gate, job.sft_objective(job.gate.variant)
    ratios = ", ".join(f"{reading['ratio']:.3g} in {name}" for name, reading in failed.items())
    prior = job.models.student.prior
    changes = [f"train a longer prior (models.student.prior.steps, now {prior.steps})"] if prior is not None else []
    changes.append("widen the variant's delta clip (e.g. a lower bound of -1)")
    return (f"gate: variant {gate.variant!r} ({pear.level} level, delta_clip {list(pear.delta_clip)}) weights the "
            f"first response token of '{gate.numerator}' rows over '{gate.denominator}' rows by {ratios}, below "
            f"gate.min_ratio {gate.min_ratio:g}; stopped before SFT. To pass, {' or '.join(changes)}; every "
            f"reading: {where}")
