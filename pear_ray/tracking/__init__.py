"""Run tracking: metrics.jsonl + TensorBoard (W&B / MLflow optional), PNG plots, and the run's report.md.

The driver owns one `MetricsLogger` per run folder; `plot_run` and `write_report` read what it wrote, so they can
also be re-run on a finished (or killed) run folder. An experiment job (several seeds, optionally a grid) is
summarised across its run folders by `aggregate`, `write_summary` and `write_experiment_report`.
"""

from pear_ray.tracking.aggregate import ExperimentSummary, aggregate, write_summary
from pear_ray.tracking.experiment_report import write_experiment_report
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
    "ExperimentSummary",
    "LoggerNotInstalledError",
    "MetricsLogger",
    "aggregate",
    "eval_stage",
    "plot_run",
    "read_histograms",
    "read_metrics",
    "results_from_metrics",
    "write_experiment_report",
    "write_report",
    "write_summary",
]
