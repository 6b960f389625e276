"""The `pear-ray` command line: one typed job file, dotted overrides, and a subcommand per stage."""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
import os
import sys
import traceback
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated

import typer
import yaml
from typer.core import TyperGroup

from pear_ray.config import JobConfig, load_job
from pear_ray.runtime import VERBOSE_ENV

# Errors a user causes with what they give (job file, overrides, data, paths): exit status 2; any other: 1.
BAD_INPUT = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


def user_facing(error: BaseException) -> BaseException:
    """The error behind Ray's wrappers: a task's own (RayTaskError.cause), or the one an actor's __init__ raised (an
    ActorDiedError holds that RayTaskError as its argument), as deep as they nest."""
    from ray.exceptions import RayActorError, RayTaskError

    while True:
        if isinstance(error, RayTaskError):
            error = error.cause
        elif isinstance(error, RayActorError) and error.args and isinstance(error.args[0], RayTaskError):
            error = error.args[0]
        else:
            return error


def describe(error: BaseException) -> str:
    """One line (or a few) naming what is wrong and where."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.strerror}: {error.filename}"
    return str(error) or type(error).__name__


class _Commands(TyperGroup):
    """Every command runs inside this: an error becomes one message on stderr and an exit status (2 for bad input,
    1 for a failure at run time), with the traceback only under --debug."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):  # --help, usage errors: typer's own
            raise
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as raised:
            if ctx.params.get("debug"):
                traceback.print_exc()
            error = user_facing(raised)
            typer.echo(f"error: {describe(error)}", err=True)
            raise typer.Exit(2 if isinstance(error, BAD_INPUT) else 1) from None


app = typer.Typer(
    cls=_Commands,
    help="pear_ray: PEAR-weighted SFT, then GRPO, on Ray (vLLM rollouts, DeepSpeed learner).",
    no_args_is_help=True,
    add_completion=False,
)

JobArg = Annotated[Path, typer.Argument(help="job config YAML (see jobs/)")]
OverridesArg = Annotated[
    list[str] | None, typer.Argument(help="dotted overrides, e.g. sft.pear.level=block rl.group_size=4")
]

RunDirOption = Annotated[
    str | None, typer.Option(help="run folder: a path, or a bucket's URL (s3://bucket/prefix, gs://bucket/prefix)",
                             show_default="<output_dir>/<name> of the job")
]
FreshOption = Annotated[bool, typer.Option(help="move an existing run folder aside (to a sibling named with the time) "
                                                "and start anew")]


def _load(job_file: Path, overrides: list[str] | None) -> JobConfig:
    return load_job(job_file, overrides or [])


def _print_version(wanted: bool) -> None:
    if wanted:
        typer.echo(f"pear_ray {package_version('pear_ray')}")
        raise typer.Exit()


@app.callback()
def _setup(
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="debug logging, and the actors' and engines' logs on the console too")] = False,
    debug: Annotated[bool, typer.Option(help="on an error, the full traceback too")] = False,
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True, help="print the version and exit")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=f"%(asctime)s %(levelname)s {'%(name)s: ' if verbose else ''}%(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    else:  # Hugging Face's bars (saving each tiny model, downloads) would crowd the stages' own
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@app.command()
def config(
    job_file: Annotated[Path | None, typer.Argument(help="job config YAML (see jobs/)")] = None,
    overrides: OverridesArg = None,
    reference: Annotated[bool, typer.Option(help="instead, print every key a job can hold with its type, default "
                                                 "and meaning (Markdown: docs/config.md)")] = False,
) -> None:
    """Print the resolved job config (file + overrides, defaults filled in) as YAML, or say what is wrong: every
    check `run` makes before it starts (models, data, task, loggers), less the run folder. With --reference, the
    reference of every key instead."""
    if reference:
        if job_file is not None:
            raise typer.BadParameter("--reference describes every job: give no job file with it", param_hint="JOB_FILE")
        from pear_ray.config.reference import reference as config_reference

        typer.echo(config_reference(), nl=False)
        return
    if job_file is None:
        raise typer.BadParameter("give a job file (or --reference for every key a job can hold)",
                                 param_hint="JOB_FILE")
    from pear_ray.driver.preflight import preflight

    job = _load(job_file, overrides)
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the YAML: libraries imported here (DeepSpeed) log there
        preflight(job, None)
    typer.echo(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False))


@app.command()
def validate(
    data_file: Annotated[str, typer.Argument(metavar="DATA",
                                             help="Parquet or JSONL file, or a `datasets` folder or Hub id")],
    model: Annotated[str, typer.Option(help="model folder or Hub id whose tokenizer the ids belong to")],
    max_prompt_tokens: Annotated[int, typer.Option(min=1, help="prompts longer than this are cut")] = 256,
    max_response_tokens: Annotated[int, typer.Option(min=1, help="responses longer than this are cut")] = 256,
) -> None:
    """Check a dataset against the schema and the model (tokenizing text columns; ids within its embedding, rows
    within its positions) and report the first problem, if any."""
    from pear_ray.config import ModelSource
    from pear_ray.data.io import load_sft_data
    from pear_ray.driver.preflight import check_positions, model_facts

    facts = model_facts(ModelSource(path=model), "--model", what=f"--model {model}")
    table = load_sft_data(data_file, facts.tokenizer, max_prompt_tokens=max_prompt_tokens,
                          max_response_tokens=max_response_tokens)
    check_positions(table, facts, data_file)
    typer.echo(f"{data_file}: {table.num_rows} rows OK; columns {table.column_names}")


@app.command("tiny-model")
def tiny_model(
    out_dir: Annotated[Path, typer.Argument(help="folder to write the Hugging Face model into")],
    seed: Annotated[int, typer.Option(help="seed of the weights and the tokenizer's corpus")] = 0,
    hidden_size: Annotated[int, typer.Option(help="width of the model")] = 64,
    num_layers: Annotated[int, typer.Option(help="number of transformer layers")] = 2,
) -> None:
    """Build a tiny Qwen2 model with a byte-level BPE tokenizer, deterministically, for tests and demos."""
    from pear_ray.models.tiny import TinyModelSpec, build_tiny_model

    path = build_tiny_model(TinyModelSpec(seed=seed, hidden_size=hidden_size, num_layers=num_layers), out_dir)
    typer.echo(str(path))


def _run(job: JobConfig, run_dir: str | None, fresh: bool = False) -> None:
    """One run folder, or for a job with seeds/grid an experiment: one folder per cell and an aggregated report;
    the job checked first (preflight), so a bad one starts nothing and writes no folder."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    from pear_ray.driver.experiment import is_experiment, run_experiment
    from pear_ray.driver.gate import run_gated
    from pear_ray.storage import RunFolder
    from pear_ray.tracking.report import results_summary

    drive = run_experiment if is_experiment(job) else run_gated
    location = _location(job, run_dir)
    with logging_redirect_tqdm():  # a log line during a stage's progress bar goes above it, not into it
        report = _into(job, location, fresh, lambda folder: drive(job, folder))
    typer.echo(f"{results_summary(report)}\n\nreport: {RunFolder(location).where(report)}")


def _location(job: JobConfig, run_dir: str | None) -> str:
    """The run folder: --run-dir, else the job's output_dir/name (either a path or a bucket's URL)."""
    from pear_ray.storage import join

    return run_dir or join(job.output_dir, job.name)


def _into(job: JobConfig, folder: str, fresh: bool, action):
    """`action(folder)` once the job passes preflight, after moving the folder aside with --fresh."""
    from pear_ray.driver.preflight import preflight
    from pear_ray.driver.run import set_aside

    preflight(job, folder, fresh=fresh)
    if fresh and (aside := set_aside(folder)):
        typer.echo(f"moved the old run folder aside to {aside}")
    return action(folder)


@app.command()
def run(
    job_file: JobArg,
    overrides: OverridesArg = None,
    run_dir: RunDirOption = None,
    fresh: FreshOption = False,
) -> None:
    """Run the job's stages in order (score, sft, rl, eval) into one run folder; rerun to resume it."""
    _run(_load(job_file, overrides), run_dir, fresh)


STAGE_COMMANDS = {
    "score": "Stage 1: bring the SFT data to behaviour log-probs (from the data, or scored by the behaviour model).",
    "sft": "Stage 2: PEAR-weighted SFT (level none = canonical SFT) on the DeepSpeed learner.",
    "rl": "Stage 3: GRPO from the SFT checkpoint, with rollouts from the rollout service and verifier rewards.",
    "eval": "Stage 4: pass@1 and pass@k (unbiased, n samples per held-out prompt) after SFT and after RL.",
}


def _stage_command(stage: str):
    """`pear-ray <stage> JOB`: `run` with stages=[<stage>], into the same run folder."""

    def command(job_file: JobArg, overrides: OverridesArg = None, run_dir: RunDirOption = None,
                fresh: FreshOption = False) -> None:
        _run(_load(job_file, [*(overrides or []), f"stages=[{stage}]"]), run_dir, fresh)

    command.__doc__ = STAGE_COMMANDS[stage]
    return command


for _stage in STAGE_COMMANDS:
    app.command(_stage)(_stage_command(_stage))


@app.command("inspect")
def inspect_(job_file: JobArg, overrides: OverridesArg = None, run_dir: RunDirOption = None,
             fresh: FreshOption = False) -> None:
    """Before training: how PEAR would weight the job's SFT data under the student as it is (runs score if needed)."""
    from pear_ray.driver.inspect import format_table, run_inspect
    from pear_ray.storage import is_url

    job = _load(job_file, overrides)
    location = _location(job, run_dir)
    if is_url(location):
        raise typer.BadParameter(f"{location}: inspect writes its figures into a local folder; give --run-dir a path",
                                 param_hint="--run-dir")
    figures, json_path, png_path = _into(job, location, fresh, lambda folder: run_inspect(job, Path(folder)))
    typer.echo(format_table(figures))
    typer.echo("\n".join(["", *figures["verdict"], "", f"figures: {json_path}", f"plot: {png_path}"]))


DEMO_JOB = "demo.yaml"  # in the package data pear_ray.jobs: the repository's jobs/ (see pyproject.toml)


@app.command()
def demo(overrides: OverridesArg = None) -> None:
    """The embedded default job (jobs/demo.yaml): canonical SFT vs PEAR-SFT then GRPO, tiny models, local CPU."""
    with importlib.resources.as_file(importlib.resources.files("pear_ray.jobs") / DEMO_JOB) as job_file:
        job = _load(job_file, overrides)
    _run(job, None)


AddressOption = Annotated[
    str | None,
    typer.Option(help="Ray dashboard (Jobs API) address",
                 show_default="RAY_API_SERVER_ADDRESS, RAY_ADDRESS if a URL, or http://127.0.0.1:8265"),
]


@app.command()
def submit(
    job_file: JobArg,
    overrides: OverridesArg = None,
    address: AddressOption = None,
    wait: Annotated[bool, typer.Option(help="follow the logs until the job ends; exit non-zero if it fails")] = True,
    working_dir: Annotated[Path | None, typer.Option(help="folder shipped to the cluster", show_default=".")] = None,
    run_dir: RunDirOption = None,
    force: Annotated[bool, typer.Option(help="submit even if the job fails the local checks (e.g. data that only "
                                             "the cluster can see)")] = False,
) -> None:
    """Submit the job to a Ray cluster through the Ray Jobs API (`pear-ray run` there, this folder shipped)."""
    from pear_ray.submit import submit_job

    job_id, status = submit_job(job_file, overrides, address, wait=wait, working_dir=working_dir, run_dir=run_dir,
                                force=force)
    typer.echo(f"job {job_id}: {status}")
    if wait and status != "SUCCEEDED":
        raise typer.Exit(1)


jobs_app = typer.Typer(help="Jobs on a Ray cluster: list, status, logs, stop.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
JobIdArg = Annotated[str, typer.Argument(help="job id printed by `pear-ray submit`")]


@jobs_app.command("list")
def jobs_list(address: AddressOption = None) -> None:
    """List the cluster's jobs: id, status, entrypoint."""
    from pear_ray.submit import list_jobs

    for job in list_jobs(address):
        typer.echo(f"{job.submission_id or job.job_id}\t{job.status.value}\t{job.entrypoint}")


@jobs_app.command("status")
def jobs_status(job_id: JobIdArg, address: AddressOption = None) -> None:
    """Print a job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    from pear_ray.submit import job_status

    typer.echo(job_status(job_id, address))


@jobs_app.command("logs")
def jobs_logs(
    job_id: JobIdArg,
    address: AddressOption = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="stream until the job ends")] = False,
) -> None:
    """Print a job's logs; with --follow, stream them until it ends and exit non-zero if it failed."""
    from pear_ray.submit import job_logs

    if not follow:
        typer.echo(job_logs(job_id, address), nl=False)
        return
    status = job_logs(job_id, address, follow=True)
    typer.echo(f"job {job_id}: {status}")
    if status != "SUCCEEDED":
        raise typer.Exit(1)


@jobs_app.command("stop")
def jobs_stop(job_id: JobIdArg, address: AddressOption = None) -> None:
    """Stop a running job."""
    from pear_ray.submit import stop_job

    typer.echo(f"job {job_id}: {'stop requested' if stop_job(job_id, address) else 'already ended'}")


if __name__ == "__main__":
    app()
