"""The gate before SFT: its config is checked when the job loads; its readings are written and judged."""

import json

import pytest

from pear_ray.config import ConfigError, load_job
from pear_ray.driver.gate import GATE_FILE, GateFailed, enforce_gate
from pear_ray.storage import RunFolder

GATE = "gate={variant: token, min_ratio: 10}"


@pytest.mark.parametrize("overrides,message", [
    (["gate={variant: tok, min_ratio: 10}"], "gate.variant 'tok' is none of the job's SFT variants"),
    (["gate={variant: none, min_ratio: 10}"], "gate.variant 'none' is canonical SFT"),
    (["gate={variant: token, min_ratio: 0}"], "gate.min_ratio"),
    (["gate={variant: token, min_ratio: 10, denominator: trace}"], "both 'trace'"),
    (["gate={variant: token, min_ratio: 10, numerator: teacher}"], "the scripted two_style policy labels its rows"),
    ([GATE, "stages=[score]"], "run none: add sft, or drop gate"),
    ([GATE, "models.behavior={tiny: {seed: 2}}"], "a behaviour model writing the data leaves out"),
])
def test_a_gate_the_job_cannot_read_is_refused_when_it_loads(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_job("jobs/pear-vs-sft.yaml", overrides)


def test_a_gate_on_given_data_names_any_two_sources():
    job = load_job("jobs/distill.yaml", ["data.sft=rows.jsonl", "sft.variants=[none,sequence]",
                                         "gate={variant: sequence, numerator: teacher, denominator: web, "
                                         "min_ratio: 2}"])
    assert (job.gate.numerator, job.gate.denominator, job.gate.min_ratio) == ("teacher", "web", 2.0)


def reading(ratio: float, min_ratio: float = 10.0) -> dict:
    return {"variant": "token", "level": "token", "delta_clip": [-0.08, 0.3],
            "first_token_weight": {"trace": 0.64 * ratio, "bare": 0.64}, "numerator": "trace",
            "denominator": "bare", "ratio": ratio, "min_ratio": min_ratio, "passed": ratio >= min_ratio}


def test_every_reading_is_written_and_one_below_the_minimum_stops_the_job_in_one_line(tmp_path):
    job = load_job("jobs/pear-vs-sft.yaml", [GATE])
    readings = {"seed0": reading(90.0), "seed1": reading(1.05), "seed2": reading(2.5)}
    with pytest.raises(GateFailed) as stopped:
        enforce_gate(job, readings, RunFolder(tmp_path))
    assert str(stopped.value) == (
        "gate: variant 'token' (token level, delta_clip [-0.08, 0.3]) weights the first response token of 'trace' "
        "rows over 'bare' rows by 1.05 in seed1, 2.5 in seed2, below gate.min_ratio 10; stopped before SFT. To pass, "
        "train a longer prior (models.student.prior.steps, now 600) or widen the variant's delta clip (e.g. a lower "
        f"bound of -1); every reading: {tmp_path / GATE_FILE}")
    written = json.loads((tmp_path / GATE_FILE).read_text())
    assert written == {"gate": {"variant": "token", "numerator": "trace", "denominator": "bare", "min_ratio": 10.0},
                       "readings": readings}
    assert enforce_gate(job, {"seed0": reading(90.0)}, RunFolder(tmp_path)) == tmp_path / GATE_FILE
