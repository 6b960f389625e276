"""Run tracking: metrics.jsonl + TensorBoard (W&B / MLflow optional), PNG plots, and the run's report.md.

The driver owns one `MetricsLogger` per run folder; `plot_run` and `write_report` read what it wrote, so they can
also be re-run on a finished (or killed) run folder.
"""

from pear_ray.tracking.metrics import (
    LoggerNotInstalledError,
    MetricsLogger,
    eval_stage,
    read_histograms,
    read_metrics,
    results_from_metrics,
)
from pear_ray.tracking.plots import plot_run
from pear_ray.tracking.report import write_report

__all__ = [
    "LoggerNotInstalledError",
    "MetricsLogger",
    "eval_stage",
    "plot_run",
    "read_histograms",
    "read_metrics",
    "results_from_metrics",
    "write_report",
]
