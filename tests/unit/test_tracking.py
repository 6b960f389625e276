"""Run tracking: metrics.jsonl + TensorBoard, resume truncation, histograms, plots, and the report table."""

import json
import math
import re
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pear_ray.tracking import (
    LoggerNotInstalledError,
    MetricsLogger,
    eval_stage,
    plot_run,
    read_histograms,
    read_metrics,
    results_from_metrics,
    write_report,
)
from pear_ray.tracking.report import WEIGHT_NOTE

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tb_scalars(run_dir, variant, stage, tag):
    acc = EventAccumulator(str(run_dir / "tensorboard" / variant / stage))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def write_synthetic_run(run_dir, *, rl=True, evals=True, pool_sizes=None, styles=False):
    """Three variants through SFT (loss, diagnostics, weight histogram), then RL and eval if asked; `styles`: RL and
    eval records carry the shares of a trace style and a bare style, as the addition task's do."""
    rng = np.random.default_rng(0)
    with MetricsLogger(run_dir, resume=False, loggers=()) as logger:
        for i, variant in enumerate(("none", "token", "block")):
            for step in range(1, 21):
                floor = 0.0 if variant == "none" else 0.02 * step * (i + 1) / 3
                logger.log("sft", step, {"loss": 2.5 * math.exp(-step / 8) + 0.1 * i, "mean_weight": 1 - floor,
                                         "ess_fraction": 1 - floor / 2, "frac_at_floor": floor,
                                         "frac_at_ceiling": 0.0, "mean_log_ratio": -0.05 * i}, variant=variant)
            weights = np.ones(500) if variant == "none" else np.exp(rng.normal(-1.0 * i, 1.5, 500).clip(-10, 5))
            logger.histogram("sft", 20, "pear_weights", weights, variant=variant)
            for step in range(1, 11) if rl else ():
                logger.log("rl", step, {"reward": 0.2 + 0.03 * step + 0.05 * i, "response_length": 40 + step,
                                        **({"rollout_actors": pool_sizes[step - 1]} if pool_sizes else {}),
                                        **(shares(0.5 + 0.04 * step) if styles else {})},
                           variant=variant)
            if evals:
                logger.log(eval_stage("sft"), 20, {"pass@1": 0.2 + 0.1 * i, "pass@8": 0.5, "num_prompts": 64,
                                                   **(shares(0.25 * i) if styles else {})}, variant=variant)
                if rl:
                    logger.log(eval_stage("rl"), 10, {"pass@1": 0.3 + 0.1 * i, "pass@8": 0.6, "num_prompts": 64,
                                                      **(shares(0.875) if styles else {})}, variant=variant)


def shares(trace: float) -> dict[str, float]:
    """A task's style shares as eval and RL log them, in its order of styles: trace first."""
    return {"share_trace": trace, "share_bare": 1 - trace}


def test_log_writes_jsonl_and_tensorboard(tmp_path):
    with MetricsLogger(tmp_path, resume=False) as logger:
        logger.log("sft", 1, {"loss": 2.0, "lr": 1e-5}, variant="token")
        logger.log("sft", 2, {"loss": np.float32(1.5), "step": 2}, variant="token")  # learner dicts carry "step"
        logger.log("rl", 1, {"reward": 0.25})
    records = read_metrics(tmp_path)
    assert [(r["stage"], r["variant"], r["step"]) for r in records] == [("sft", "token", 1), ("sft", "token", 2),
                                                                        ("rl", None, 1)]
    assert records[0]["loss"] == 2.0 and records[0]["lr"] == 1e-5 and isinstance(records[0]["time"], float)
    assert tb_scalars(tmp_path, "token", "sft", "sft/loss") == [(1, 2.0), (2, 1.5)]
    assert tb_scalars(tmp_path, "default", "rl", "rl/reward") == [(1, 0.25)]


def test_log_refuses_bad_values(tmp_path):
    with MetricsLogger(tmp_path, resume=False, loggers=()) as logger:
        with pytest.raises(ValueError, match="stage"):
            logger.log("sft", 1, {"stage": 1.0})
        with pytest.raises(ValueError, match="step"):
            logger.log("sft", 1, {"step": 7})
        with pytest.raises(TypeError, match="'loss'"):
            logger.log("sft", 1, {"loss": "high"})
    assert read_metrics(tmp_path) == []


def test_truncate_after_drops_exactly_the_later_lines(tmp_path):
    with MetricsLogger(tmp_path, resume=False) as logger:
        for step in range(1, 6):
            logger.log("sft", step, {"loss": float(step)}, variant="token")
            logger.log("sft", step, {"loss": 10.0 + step}, variant="none")
            logger.log("rl", step, {"reward": 0.1}, variant="token")
    before = read_metrics(tmp_path)

    with MetricsLogger(tmp_path, resume=True) as logger:  # resumed from the token SFT checkpoint at step 3
        assert logger.truncate_after("sft", "token", 3) == 2
        for step in (4, 5):
            logger.log("sft", step, {"loss": 100.0 + step}, variant="token")

    after = read_metrics(tmp_path)
    dropped = [r for r in before if r["stage"] == "sft" and r["variant"] == "token" and r["step"] > 3]
    assert after[: len(before) - 2] == [r for r in before if r not in dropped]  # everything else kept, in order
    token_sft = [(r["step"], r["loss"]) for r in after if r["stage"] == "sft" and r["variant"] == "token"]
    assert token_sft == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 104.0), (5, 105.0)]
    # TensorBoard purged the same steps for that (variant, stage) only.
    assert tb_scalars(tmp_path, "token", "sft", "sft/loss") == token_sft
    assert [v for _, v in tb_scalars(tmp_path, "none", "sft", "sft/loss")] == [11.0, 12.0, 13.0, 14.0, 15.0]
    assert len(tb_scalars(tmp_path, "token", "rl", "rl/reward")) == 5


def test_resume_drops_a_torn_line_and_fresh_start_clears(tmp_path):
    with MetricsLogger(tmp_path, resume=False, loggers=()) as logger:
        logger.log("sft", 1, {"loss": 1.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"time": 1.0, "stage": "sft", "var')  # the process was killed mid-line
    assert len(read_metrics(tmp_path)) == 1
    with MetricsLogger(tmp_path, resume=True, loggers=()) as logger:
        logger.log("sft", 2, {"loss": 0.5})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]

    with MetricsLogger(tmp_path, resume=False, loggers=()):
        pass
    assert read_metrics(tmp_path) == []


def test_histogram_keeps_latest_values_and_writes_tensorboard(tmp_path):
    with MetricsLogger(tmp_path, resume=False) as logger:
        logger.histogram("sft", 1, "pear_weights", [0.5, 1.0, 2.0], variant="token")
        logger.histogram("sft", 2, "pear_weights", np.array([0.1, 1.0, float("nan")]), variant="token")
    (hist,) = read_histograms(tmp_path)
    assert (hist["variant"], hist["stage"], hist["name"], hist["step"]) == ("token", "sft", "pear_weights", 2)
    np.testing.assert_allclose(hist["values"], [0.1, 1.0])  # latest only, non-finite dropped
    acc = EventAccumulator(str(tmp_path / "tensorboard" / "token" / "sft"), size_guidance={"histograms": 0})
    acc.Reload()
    assert [e.step for e in acc.Histograms("sft/pear_weights")] == [1, 2]


def test_uninstalled_or_unknown_logger_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError, installed or not
    with pytest.raises(LoggerNotInstalledError, match=r"'wandb'.*not installed.*pip install wandb"):
        MetricsLogger(tmp_path, resume=False, loggers=("tensorboard", "wandb"))
    with pytest.raises(ValueError, match="unknown logger"):
        MetricsLogger(tmp_path, resume=False, loggers=("neptune",))


def test_results_from_metrics(tmp_path):
    write_synthetic_run(tmp_path)
    results = results_from_metrics(read_metrics(tmp_path))
    assert results["token"]["sft"] == {"pass@1": pytest.approx(0.3), "pass@8": 0.5, "num_prompts": 64}
    assert results["block"]["rl"]["pass@1"] == pytest.approx(0.5)


def test_plot_run_writes_valid_pngs(tmp_path):
    write_synthetic_run(tmp_path)
    paths = plot_run(tmp_path)
    assert sorted(p.name for p in paths) == sorted(["sft_loss.png", "pear_diagnostics.png",
                                                    "pear_weight_histogram.png", "rl_reward_length.png",
                                                    "pass_at_k.png"])
    for path in paths:
        assert path.parent == tmp_path / "plots"
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, path


def _png_width(path) -> int:
    return int.from_bytes(path.read_bytes()[16:20], "big")  # IHDR's width field


@pytest.mark.parametrize("sizes, styles, panels", [([1] * 10, False, 2), ([1, 1, 1, 2, 2, 2, 1, 1, 1, 1], False, 3),
                                                    ([1] * 10, True, 3)],
                         ids=["fixed-pool", "elastic-pool", "styles"])
def test_rl_plot_shows_the_pool_size_only_when_it_changed_and_the_first_style_share_when_logged(tmp_path, sizes,
                                                                                                styles, panels):
    write_synthetic_run(tmp_path / "plain")
    write_synthetic_run(tmp_path / "more", pool_sizes=sizes, styles=styles)
    [plain] = [p for p in plot_run(tmp_path / "plain") if p.name == "rl_reward_length.png"]
    [more] = [p for p in plot_run(tmp_path / "more") if p.name == "rl_reward_length.png"]
    assert _png_width(more) / _png_width(plain) == pytest.approx(panels / 2, rel=0.02)


def test_plot_run_skips_plots_without_metrics(tmp_path):
    write_synthetic_run(tmp_path)
    plot_run(tmp_path)
    write_synthetic_run(tmp_path, rl=False, evals=False)  # a fresh run in the same folder: SFT only
    names = {p.name for p in plot_run(tmp_path)}
    assert names == {"sft_loss.png", "pear_diagnostics.png", "pear_weight_histogram.png"}
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(names)  # stale RL/eval plots removed


def test_report_table_and_deltas(tmp_path):
    write_synthetic_run(tmp_path)
    (tmp_path / "config.yaml").write_text("name: demo\n")
    results = {
        "token": {"sft": {"pass@1": 0.30, "pass@8": 0.52, "num_prompts": 400}, "rl": {"pass@1": 0.45, "pass@8": 0.53}},
        "none": {"sft": {"pass@1": 0.20, "pass@8": 0.45}, "rl": {"pass@1": 0.30, "pass@8": 0.60}},
        "block": {"sft": {"pass@1": 0.22, "pass@8": 0.48}},  # RL never ran for this one
    }
    text = write_report(tmp_path, results, seed=7, job_name="demo", extra={"student": "tiny"}).read_text()

    assert "seed: 7" in text and "[config.yaml](config.yaml)" in text and "- student: tiny" in text
    rows = {}  # first table only: the later tables reuse the variant names
    for line in text.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split("|")[1].strip(), [c.strip() for c in line.split("|")[2:-1]])
    # columns: mean PEAR weight over the SFT steps (1 - floor logged above, averaged),
    # pass@1 SFT, pass@8 SFT, pass@1 RL, pass@8 RL, Δ pass@1, Δ pass@8; noise margin 1/sqrt(400) = 0.05
    assert "| SFT variant | mean PEAR weight (SFT) |" in text
    assert WEIGHT_NOTE in text  # what the mean weight is not (a learning-rate factor), under the table
    assert rows["none (canonical SFT, baseline)"] == ["1.000", "0.200", "0.450", "0.300", "0.600", "+0.100", "+0.150"]
    assert rows["token"] == ["0.860", "0.300", "0.520", "0.450", "0.530", "+0.150", "(+0.010)"]  # (): noise
    assert rows["block"] == ["0.790", "0.220", "0.480", "–", "–", "–", "–"]
    assert list(rows).index("none (canonical SFT, baseline)") < list(rows).index("block") < list(rows).index("token")
    assert "±0.050" in text and "N = 400" in text
    # the vs-canonical table: columns pass@1, pass@8 after SFT, then after RL
    assert "| token | +0.100 | +0.070 | +0.150 | -0.070 |" in text
    assert "| block | (+0.020) | (+0.030) | – | – |" in text
    for name in ("pass_at_k", "sft_loss", "pear_diagnostics", "pear_weight_histogram", "rl_reward_length"):
        assert re.search(rf"!\[[^]]+\]\(plots/{name}\.png\)", text), name
    assert "PEAR diagnostics at the end of SFT" in text and "| token | 20 |" in text


def test_report_says_when_everything_is_noise(tmp_path):
    results = {"none": {"sft": {"pass@1": 0.02, "num_prompts": 16}, "rl": {"pass@1": 0.03}},
               "token": {"sft": {"pass@1": 0.01}, "rl": {"pass@1": 0.04}}}
    text = write_report(tmp_path, results, seed=0, job_name="tiny").read_text()
    assert "cannot tell the variants apart" in text and "solves almost nothing" in text
    assert "| token | – | 0.010 |" in text  # no SFT metrics: no mean weight
    assert "config.yaml not" in text or "not in the run folder" in text
    assert "No PEAR diagnostics" in text


def test_report_shows_the_first_styles_share_after_sft_and_after_rl_when_logged(tmp_path):
    write_synthetic_run(tmp_path, styles=True)
    text = write_report(tmp_path, results_from_metrics(read_metrics(tmp_path)), seed=0, job_name="demo").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| SFT variant | mean PEAR weight"))
    assert header.endswith("| Δ pass@8 (RL − SFT) | trace share after SFT | trace share after RL |")
    assert "bare share" not in text  # one style is enough: the first the task names
    rows = {}  # the first table's last two columns
    for line in text.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split("|")[1].strip(), [c.strip() for c in line.split("|")[-3:-1]])
    # variants none, token, block logged trace shares 0, 0.25, 0.5 after SFT and 0.875 after RL
    assert rows["none (canonical SFT, baseline)"] == ["0.000", "0.875"]
    assert rows["token"] == ["0.250", "0.875"] and rows["block"] == ["0.500", "0.875"]
    assert "The trace share is the fraction of the eval samples" in text and "`share_trace`" in text
    plain = tmp_path / "plain"
    write_synthetic_run(plain)
    assert "share" not in write_report(plain, results_from_metrics(read_metrics(plain)), seed=0,
                                       job_name="demo").read_text()
