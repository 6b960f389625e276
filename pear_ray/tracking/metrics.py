"""Per-run metrics: one append-only JSON-lines file (the source of truth the plots and report read), mirrored to
TensorBoard and, when asked for and installed, to W&B and MLflow.

Layout of a run folder (one `MetricsLogger` per folder, owned by the driver):

    metrics.jsonl                          {"time", "stage", "variant", "step", <name>: <float>, ...} per line
    tensorboard/{variant}/{stage}/         one TensorBoard run per (variant, stage); tags are "{stage}/{name}"
    histograms/{variant}_{stage}_{name}.npz  the latest histogram data ("values", "step") for the plots

Names the plots and report look for: SFT records (stage "sft") carry "loss" and the PEAR diagnostics
(mean_weight, ess_fraction, frac_at_floor, frac_at_ceiling, mean_log_ratio), as the learner's PEAR-SFT step returns them;
the weight histogram is `histogram("sft", step, "pear_weights", w[mask])`; RL records (stage "rl") carry "reward"
and "response_length". For a task with response styles (pear_ray.tasks.base.StyledTask), eval and RL records also
carry "share_<style>" (`style_share`), the fraction of the samples in each style, in the task's order of styles.

All of it is written locally; for a run folder in a bucket (pear_ray/storage.py) the driver publishes what changed at
every checkpoint and stage end, and a resume fetches RESUMED_FILES before the logger opens.

One TensorBoard run per (variant, stage) is deliberate: TensorBoard overlays runs that share a tag, so "sft/loss"
shows every variant on one chart (the comparison the project exists for), and a resumed stage can purge its own
steps after the checkpoint without touching any other variant or stage.

Eval results are logged as stage `eval_sft` / `eval_rl` (see `eval_stage`) with values named "pass@{k}" (plus
optional "num_prompts"); `results_from_metrics` turns them back into the `results` dict the report takes.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pear_ray import atomic

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
HISTOGRAM_DIR = "histograms"
WANDB_ID_FILE, MLFLOW_ID_FILE = "wandb_run_id", "mlflow_run_id"
# What a resumed logger reads of its run folder (TensorBoard only appends: a resumed pair purges its own steps).
RESUMED_FILES = (METRICS_FILE, HISTOGRAM_DIR, WANDB_ID_FILE, MLFLOW_ID_FILE)
PEAR_WEIGHTS_HISTOGRAM = "pear_weights"  # histogram name (stage "sft") the weight-histogram plot draws
STYLE_SHARE_PREFIX = "share_"  # share_<style>: the fraction of samples in a task's response style
STYLE_COUNT_PREFIX = "style_"  # style_<style>: a held-out prompt's samples in a response style (eval's Parquet)
DEFAULT_VARIANT = "default"  # stands for variant=None in folder names and plot labels
RESERVED_FIELDS = ("time", "stage", "variant", "step")
LOGGER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


class LoggerNotInstalledError(ValueError):
    """A logger was requested in the config but its package is not installed here."""


def eval_stage(after: str) -> str:
    """Stage name for pass@k measured after training stage `after` ("sft" or "rl"): "eval_sft", "eval_rl"."""
    return f"eval_{after}"


def style_share(style: str) -> str:
    """Name of the metric of the fraction of samples written in response style `style`: "share_trace"."""
    return f"{STYLE_SHARE_PREFIX}{style}"


def style_column(style: str) -> str:
    """Name of eval's per-prompt column of how many of a prompt's n samples are in style `style`: "style_trace"."""
    return f"{STYLE_COUNT_PREFIX}{style}"


def first_style_share(names: Iterable[str]) -> str | None:
    """The first `share_<style>` among metric names (a record's keys, in the order logged): the task's first style,
    the one the report and plots show; None when there is none."""
    return next((name for name in names if name.startswith(STYLE_SHARE_PREFIX)), None)


def variant_name(variant: str | None) -> str:
    return DEFAULT_VARIANT if variant is None else variant


def _safe(name: str) -> str:
    """A file-name-safe version of a stage/variant/metric name."""
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", name)


def _parse_lines(text: str, path: Path) -> tuple[list[dict], str]:
    """Records of a metrics file, and its text cut back to the complete records. A torn last line (the process was
    killed while writing it) is left out; a broken line anywhere else is an error."""
    records, kept = [], []
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON ({e})") from e
        kept.append(line + "\n")
    return records, "".join(kept)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All metric records of a run, in the order they were written ([] when there is no metrics file yet)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return _parse_lines(path.read_text(), path)[0]


def read_histograms(run_dir: str | Path) -> list[dict[str, Any]]:
    """The latest histogram of each (variant, stage, name): dicts with variant, stage, name, step, values."""
    out = []
    for path in sorted((Path(run_dir) / HISTOGRAM_DIR).glob("*.npz")):
        with np.load(path, allow_pickle=False) as data:
            out.append({"variant": str(data["variant"]), "stage": str(data["stage"]), "name": str(data["name"]),
                        "step": int(data["step"]), "values": data["values"]})
    return out


def results_from_metrics(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """The report's `results` dict rebuilt from eval records: {variant: {"sft"|"rl": {"pass@1": x, ...}}}.

    The last record of each (variant, stage) wins, so a re-run eval replaces the earlier one.
    """
    results: dict[str, dict[str, dict[str, float]]] = {}
    for rec in records:
        stage = str(rec.get("stage", ""))
        if not stage.startswith("eval_"):
            continue
        values = {k: v for k, v in rec.items() if k not in RESERVED_FIELDS}
        results.setdefault(variant_name(rec.get("variant")), {})[stage.removeprefix("eval_")] = values
    return results


def _to_float(name: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {name!r} must be a number, got {type(value).__name__}: {value!r}") from None


class _WandbMirror:
    """W&B run mirroring every scalar; each (variant, stage) has its own step axis, declared with define_metric."""

    def __init__(self, run_dir: Path, resume: bool, run_name: str | None, config: Mapping | None):
        import wandb

        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.exists() else None
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "pear_ray"), name=run_name, id=run_id,
                              resume="allow" if run_id else None, dir=str(run_dir), config=dict(config or {}))
        atomic.write_text(id_file, self.run.id)
        self.prefixes: set[str] = set()

    def _declare(self, prefix: str) -> None:
        if prefix not in self.prefixes:
            self.wandb.define_metric(f"{prefix}/step")
            self.wandb.define_metric(f"{prefix}/*", step_metric=f"{prefix}/step")
            self.prefixes.add(prefix)

    def log(self, prefix: str, step: int, values: Mapping[str, float]) -> None:
        self._declare(prefix)
        self.run.log({f"{prefix}/step": step, **{f"{prefix}/{k}": v for k, v in values.items()}})

    def histogram(self, prefix: str, step: int, name: str, values: np.ndarray) -> None:
        self._declare(prefix)
        self.run.log({f"{prefix}/step": step, f"{prefix}/{name}": self.wandb.Histogram(values)})

    def close(self) -> None:
        self.run.finish()


class _MlflowMirror:
    """MLflow run mirroring every scalar (MLflow keys cannot hold '@', so pass@8 becomes pass_at_8)."""

    def __init__(self, run_dir: Path, resume: bool, run_name: str | None, config: Mapping | None):
        import mlflow

        id_file = run_dir / MLFLOW_ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.exists() else None
        self.mlflow = mlflow
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name)
        atomic.write_text(id_file, self.run.info.run_id)
        if config and not run_id:
            mlflow.log_params({k: str(v)[:500] for k, v in _flatten(config).items()})

    def log(self, prefix: str, step: int, values: Mapping[str, float]) -> None:
        key = lambda name: re.sub(r"[^A-Za-z0-9_\-. /]", "_", f"{prefix}/{name}".replace("@", "_at_"))  # noqa: E731
        self.mlflow.log_metrics({key(k): v for k, v in values.items() if math.isfinite(v)}, step=step)

    def histogram(self, prefix: str, step: int, name: str, values: np.ndarray) -> None:
        pass  # MLflow has no histogram type; the scalars carry the diagnostics

    def close(self) -> None:
        self.mlflow.end_run()


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


class MetricsLogger:
    """Writes one run's metrics: metrics.jsonl always, plus the requested `loggers`.

    resume=False starts the run's tracking afresh (metrics.jsonl, tensorboard/ and histograms/ are emptied, so two
    runs never mix in one folder); resume=True appends, after dropping a torn last line left by a killed process.
    After loading a checkpoint at step k, call `truncate_after(stage, variant, k)` before logging step k+1.

    loggers: any of "tensorboard", "wandb", "mlflow"; an unknown or uninstalled one is an error, never a silent skip.
    """

    def __init__(self, run_dir: str | Path, *, resume: bool, loggers: Iterable[str] = ("tensorboard",),
                 run_name: str | None = None, config: Mapping | None = None):
        self.run_dir = Path(run_dir)
        self.loggers = tuple(dict.fromkeys(loggers))
        unknown = [name for name in self.loggers if name not in LOGGER_PACKAGES]
        if unknown:
            raise ValueError(f"unknown logger(s) {unknown}; choose from {sorted(LOGGER_PACKAGES)}")
        for name in self.loggers:
            require_logger(name)

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self._lock = threading.Lock()
        self._writers: dict[tuple[str, str], Any] = {}  # (variant, stage) -> SummaryWriter
        self._purge_step: dict[tuple[str, str], int] = {}  # TensorBoard purge for the next writer of that pair
        if resume:
            self._drop_torn_tail()
        else:
            self.path.unlink(missing_ok=True)
            for sub in (TENSORBOARD_DIR, HISTOGRAM_DIR):
                shutil.rmtree(self.run_dir / sub, ignore_errors=True)
        self._file: io.TextIOBase | None = open(self.path, "a", encoding="utf-8")
        self._mirrors = [cls(self.run_dir, resume, run_name or self.run_dir.name, config)
                         for name, cls in (("wandb", _WandbMirror), ("mlflow", _MlflowMirror)) if name in self.loggers]

    # -- writing ---------------------------------------------------------------------------------------------------

    def log(self, stage: str, step: int, values: Mapping[str, Any], *, variant: str | None = None) -> None:
        """Record scalar `values` of `stage` at `step`: one flushed JSON line, plus the mirrors.

        Values must be numbers (numpy/torch scalars are fine). A "step" entry equal to `step` is dropped (so a
        learner's result dict can be passed as is); any other clash with time/stage/variant/step is an error.
        """
        step = int(step)
        clean: dict[str, float] = {}
        for name, value in values.items():
            if name in RESERVED_FIELDS:
                if name == "step" and int(value) == step:
                    continue
                raise ValueError(f"metric name {name!r} clashes with a record field; rename it")
            clean[name] = _to_float(name, value)
        record = {"time": time.time(), "stage": stage, "variant": variant, "step": step, **clean}
        with self._lock:
            self._require_open()
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
            if "tensorboard" in self.loggers:
                writer = self._writer(variant, stage)
                for name, value in clean.items():
                    writer.add_scalar(f"{stage}/{name}", value, step)
                writer.flush()
            for mirror in self._mirrors:
                mirror.log(f"{variant_name(variant)}/{stage}", step, clean)

    def histogram(self, stage: str, step: int, name: str, values: Any, *, variant: str | None = None) -> None:
        """Record a distribution (e.g. the PEAR weights of the step's response tokens): a TensorBoard histogram,
        and the raw values saved as the latest histogram of (variant, stage, name) for the plots."""
        array = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values, dtype=np.float32).ravel()
        array = array[np.isfinite(array)]
        with self._lock:
            self._require_open()
            hist_dir = self.run_dir / HISTOGRAM_DIR
            hist_dir.mkdir(exist_ok=True)
            buffer = io.BytesIO()
            np.savez(buffer, values=array, step=np.int64(step), variant=np.str_(variant_name(variant)),
                     stage=np.str_(stage), name=np.str_(name))
            target = hist_dir / f"{_safe(variant_name(variant))}_{_safe(stage)}_{_safe(name)}.npz"
            atomic.write_bytes(target, buffer.getvalue())
            if "tensorboard" in self.loggers and array.size:
                writer = self._writer(variant, stage)
                writer.add_histogram(f"{stage}/{name}", array, int(step))
                writer.flush()
            for mirror in self._mirrors:
                mirror.histogram(f"{variant_name(variant)}/{stage}", int(step), name, array)

    def truncate_after(self, stage: str, variant: str | None, step: int) -> int:
        """Drop the records of (stage, variant) with step > `step` (a resume from the checkpoint at `step`), by an
        atomic rewrite of metrics.jsonl; TensorBoard purges its own copies when that pair logs next.
        Returns the number of records dropped."""
        with self._lock:
            self._require_open()
            self._file.close()
            try:
                text = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
                kept, dropped = [], 0
                for record in _parse_lines(text, self.path)[0]:
                    if record.get("stage") == stage and record.get("variant") == variant and record["step"] > step:
                        dropped += 1
                    else:
                        kept.append(json.dumps(record) + "\n")
                if "".join(kept) != text:
                    atomic.write_bytes(self.path, "".join(kept).encode())
            finally:
                self._file = open(self.path, "a", encoding="utf-8")
            key = (variant_name(variant), stage)
            writer = self._writers.pop(key, None)
            if writer is not None:
                writer.close()
            self._purge_step[key] = int(step) + 1
            return dropped

    def flush(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()
            for writer in self._writers.values():
                writer.flush()

    def close(self) -> None:
        """Flush and close everything; safe to call twice."""
        with self._lock:
            if self._file is None:
                return
            self._file.close()
            self._file = None
            for writer in self._writers.values():
                writer.close()
            self._writers.clear()
            for mirror in self._mirrors:
                mirror.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------------------------

    def _require_open(self) -> None:
        if self._file is None:
            raise RuntimeError(f"MetricsLogger for {self.run_dir} is closed")

    def _writer(self, variant: str | None, stage: str):
        key = (variant_name(variant), stage)
        writer = self._writers.get(key)
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter

            log_dir = self.run_dir / TENSORBOARD_DIR / _safe(key[0]) / _safe(stage)
            writer = SummaryWriter(str(log_dir), purge_step=self._purge_step.pop(key, None))
            self._writers[key] = writer
        return writer

    def _drop_torn_tail(self) -> None:
        if not self.path.exists():
            return
        text = self.path.read_text(encoding="utf-8")
        complete = _parse_lines(text, self.path)[1]
        if complete != text:
            atomic.write_bytes(self.path, complete.encode())


def require_logger(logger: str) -> None:
    package = LOGGER_PACKAGES[logger]
    try:
        __import__(package)
    except ImportError:
        raise LoggerNotInstalledError(
            f"logger {logger!r} was requested but the {package!r} package is not installed in this environment; "
            f"install it (pip install {package}) or remove {logger!r} from the loggers"
        ) from None
