"""Run folders in a bucket (an S3 server on loopback; the GCS emulator for gs://): a job runs into s3://, is killed after an SFT checkpoint and
resumes on a "fresh machine" (an empty scratch folder, nothing local) from what the bucket holds, to the results of
an uninterrupted run; a bucket that cannot be used is refused before anything starts; no credential is written or
printed anywhere."""

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from support.cli import ROOT, SMALL, finish, pear_ray, stop_group
from support.stores import ACCESS_KEY_ID, SECRET_ACCESS_KEY, ObjectStore, S3Store, free_port, moto_server

from pear_ray import faults
from pear_ray.config import load_job
from pear_ray.driver.run import RunState
from pear_ray.engines.checkpoints import MANIFEST

BUCKET = "runs"
# score and SFT of the smoke job, a checkpoint after every SFT step (4 steps of 8 of the 32 rows)
JOB = [str(ROOT / "jobs" / "smoke.yaml"), *SMALL, "stages=[score,sft]", "sft.checkpoint_every=1"]
CUT_AT_SECOND_CHECKPOINT = "checkpoint-write/sft-token:2"  # every file of step2 uploaded, its manifest not


@pytest.fixture(scope="module")
def bucket(s3):
    return s3.create_bucket(BUCKET)


@pytest.fixture(scope="module")
def scored_data(tmp_path_factory) -> list[str]:
    """The job's overrides for SFT rows that carry behaviour log-probs already, so the score stage only copies
    them (no vLLM): the short version of the job."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    rows = [{"prompt_ids": rng.integers(3, 300, 6).tolist(), "response_ids": rng.integers(3, 300, 5).tolist(),
             "behavior_logprobs": (-rng.uniform(0.5, 3.0, 5)).tolist()} for _ in range(32)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return [f"data.sft={path}", "models.behavior=null", "score.teacher_sft_steps=0"]


def run(store, scratch: Path, url: str, *args: str, env: dict | None = None):
    """`pear-ray run` into `url`, as on a machine whose only local folder for the run is `scratch`."""
    return pear_ray("run", *JOB, *args, "--run-dir", url,
                    env={**os.environ, **store.env(PEAR_RAY_SCRATCH=str(scratch)), **(env or {})})


def killed(store, scratch: Path, url: str, *args: str) -> str:
    """The run killed where CUT_AT_SECOND_CHECKPOINT says; its output."""
    process = run(store, scratch, url, *args, env={faults.KILL_AT_ENV: CUT_AT_SECOND_CHECKPOINT})
    try:
        output, _ = process.communicate(timeout=600)
    finally:
        stop_group(process)
    assert process.returncode == -signal.SIGKILL, output[-3000:]
    return output


def records(store, prefix: str) -> list[dict]:
    return [json.loads(line) for line in store.read(f"{prefix}/metrics.jsonl").decode().splitlines()]


def by_step(rows: list[dict], stage: str) -> dict[int, dict]:
    return {row["step"]: row for row in rows if row["stage"] == stage}


def assert_same_figures(got: dict, expected: dict) -> None:
    """One logged step's figures equal, but for wall-clock ones (how long, not what)."""
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        if name not in ("time", "stage", "variant", "step") and not name.endswith(("_seconds", "_busy")):
            assert got[name] == pytest.approx(value, rel=1e-5, abs=1e-6), (expected["stage"], expected["step"], name)


def written_text(store, prefix: str, *folders: Path) -> str:
    """Every object under `prefix` and every file in `folders`, as one text, to search for secrets in."""
    texts = [store.read(f"{prefix}/{name}").decode(errors="replace") for name in store.objects(prefix)]
    texts += [path.read_text(errors="replace") for folder in folders for path in folder.rglob("*") if path.is_file()]
    return "\n".join(texts)


@pytest.fixture(params=["s3", pytest.param("gs", marks=pytest.mark.slow)])
def store(request) -> ObjectStore:
    """moto's S3 server, or the GCS emulator (slow: the same code as for S3 above pyarrow's file system)."""
    return request.getfixturevalue("s3" if request.param == "s3" else "gcs")


def test_a_run_killed_after_an_sft_checkpoint_resumes_from_the_bucket_with_nothing_local(store, scored_data,
                                                                                       tmp_path):
    """The drill "the whole cluster gone, the run resumed on a new one from the bucket": the second checkpoint's
    upload is cut before its manifest, the first machine's disk is gone, and the rerun on an empty scratch takes
    state, data and checkpoint from the bucket, passes over the cut checkpoint and logs every step once, the steps
    it repeats with the values the killed run logged."""
    bucket = store.create_bucket("killed-runs")
    url, prefix = f"{store.scheme}://{bucket}/killed", f"{bucket}/killed"
    first, second = tmp_path / "first-machine", tmp_path / "second-machine"
    console = killed(store, first, url, *scored_data)
    checkpoints = store.objects(f"{prefix}/checkpoints/sft-token")
    assert store.read(f"{prefix}/checkpoints/sft-token/latest") == b"step1"
    assert f"step1/{MANIFEST}" in checkpoints and f"step2/{MANIFEST}" not in checkpoints
    assert {name.partition("/")[2] for name in checkpoints if name.startswith("step2/")} == {
        name.partition("/")[2] for name in checkpoints if name.startswith("step1/") and not name.endswith(MANIFEST)}
    before = by_step(records(store, prefix), "sft")
    assert sorted(before) == [1, 2]  # step 2 was published with the metrics, before its checkpoint
    assert json.loads(store.read(f"{prefix}/state.json"))["done"] == {"score": "data/sft.parquet"}

    output = finish(run(store, second, url, *scored_data))
    assert "score: done in an earlier run, skipping" in output and "sft-token: resuming at step 1" in output
    assert f"report: {url}/report.md" in output
    after = by_step(records(store, prefix), "sft")
    assert sorted(after) == [1, 2, 3, 4] and len([r for r in records(store, prefix) if r["stage"] == "sft"]) == 4
    assert_same_figures(after[2], before[2])  # the repeated step, as the killed run logged it
    assert set(json.loads(store.read(f"{prefix}/state.json"))["done"]) == {"score", "sft/token"}
    for name in ("report.md", "config.yaml", "data/sft.parquet", "models/sft-token/model.safetensors",
                 "plots/sft_loss.png"):
        assert name in store.objects(prefix), name
    written = written_text(store, prefix, first, second) + console + output
    assert SECRET_ACCESS_KEY not in written and ACCESS_KEY_ID not in written


@pytest.mark.slow  # about 3 minutes: an uninterrupted run, a killed one and its resumption, at two learner ranks
def test_a_resumed_run_on_two_ranks_ends_with_the_uninterrupted_run_s_results(s3, bucket, tmp_path):
    """The whole job (the teacher trained, the data written with vLLM), at two learner ranks, each uploading its own
    files: the run resumed on an empty scratch, each rank fetching the checkpoint it loads, logs every step and every
    figure of the uninterrupted run, and exports the same weights."""
    from safetensors.numpy import load_file

    ranks = ["resources.learner.num_ranks=2", "resources.learner.num_cpus=0.25"]
    finish(run(s3, tmp_path / "reference", f"s3://{bucket}/reference2", *ranks))
    killed(s3, tmp_path / "first", f"s3://{bucket}/killed2", *ranks)
    shards = {name for name in s3.objects(f"{bucket}/killed2/checkpoints/sft-token") if name.startswith("step1/")}
    assert {"step1/rng_rank0.pt", "step1/rng_rank1.pt", "step1/zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= shards
    finish(run(s3, tmp_path / "second", f"s3://{bucket}/killed2", *ranks))
    reference, resumed = records(s3, f"{bucket}/reference2"), records(s3, f"{bucket}/killed2")
    key = lambda row: (row["stage"], row["variant"], row["step"])  # noqa: E731
    assert sorted(map(key, resumed)) == sorted(map(key, reference))
    ours = {key(row): row for row in resumed}
    for row in reference:
        assert_same_figures(ours[key(row)], row)
    weights = [load_file(tmp_path / machine / "s3" / bucket / run_name / "models" / "sft-token" / "model.safetensors")
               for machine, run_name in (("reference", "reference2"), ("second", "killed2"))]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert (weights[0][name] == weights[1][name]).all(), name


def refused(env: dict, tmp_path: Path, url: str, *args: str) -> str:
    """`pear-ray run` into `url` that preflight refuses: exit status 2, a message naming the URL and no credential,
    nothing written locally (no scratch copy, nothing in the working folder). Returns the message."""
    scratch, cwd = tmp_path / "scratch", tmp_path / "cwd"
    cwd.mkdir(parents=True)
    process = pear_ray("run", *JOB, *args, "--run-dir", url, cwd=cwd,
                       env={**os.environ, **env, "PEAR_RAY_SCRATCH": str(scratch)})
    try:
        output, _ = process.communicate(timeout=300)
    finally:
        stop_group(process)
    assert process.returncode == 2, output[-3000:]
    assert "Traceback" not in output and "Ray" not in output  # refused before Ray started
    assert SECRET_ACCESS_KEY not in output and ACCESS_KEY_ID not in output
    assert not scratch.exists() and list(cwd.iterdir()) == []
    message = output[output.rindex("error: "):].strip()
    assert message.startswith(f"error: run folder {url}"), output[-3000:]
    return message.removeprefix(f"error: run folder {url}")


def test_a_missing_bucket_is_refused_in_one_line_and_nothing_is_written(s3, tmp_path):
    assert refused(s3.env(), tmp_path, "s3://no-such-bucket/run") == (
        ": the bucket no-such-bucket does not exist (create it, or check the URL and endpoint)")


def test_a_store_that_refuses_the_credentials_is_refused_in_one_line(tmp_path):
    with moto_server(refuse_everyone=True) as locked:
        message = refused(locked.env(), tmp_path, f"s3://{BUCKET}/run")
    assert message.startswith(": access refused: check the credentials") and "\n" not in message


def test_an_unreachable_endpoint_is_refused_in_one_line_naming_it(tmp_path):
    nowhere = S3Store(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    assert refused(nowhere.env(), tmp_path, f"s3://{BUCKET}/run") == (
        f": the store cannot be reached at {nowhere.endpoint}: check AWS_ENDPOINT_URL and the network")


def test_a_prefix_bound_to_another_config_is_refused_and_left_as_it_was(s3, bucket, s3_env, tmp_path):
    url, prefix = f"s3://{bucket}/bound", f"{bucket}/bound"
    RunState(url, load_job(JOB[0], [*JOB[1:], "sft.optimizer.lr=0.5"]))  # a run folder of another config
    held = {name: s3.read(f"{prefix}/{name}") for name in s3.objects(prefix)}
    assert list(held) == ["state.json"]
    message = refused(s3.env(), tmp_path / "cli", url)
    assert message.startswith(" holds the results of another config; changed since:")
    assert "sft.optimizer.lr: 0.5 -> 0.0001" in message and "--fresh" in message
    assert {name: s3.read(f"{prefix}/{name}") for name in s3.objects(prefix)} == held


@pytest.mark.slow  # about 4 minutes: a tiny experiment of two seeds, then its rerun on an empty scratch
def test_an_experiment_in_a_bucket_is_aggregated_again_on_a_fresh_machine_without_training(s3, bucket, tmp_path):
    """The job folder in a bucket: each cell publishes its folder and the shared prior, the experiment its report,
    summary and wall times; a rerun on an empty scratch trains nothing (the cells' state, metrics and eval results,
    and the prior, come from the bucket) and writes the same summary."""
    url, prefix = f"s3://{bucket}/experiment", f"{bucket}/experiment"
    tiny = ["seeds=[0,1]", "stages=[score,sft,eval]", "sft.variants=[none,token]", "task.num_train=32",
            "task.num_eval=6", "models.student.prior.steps=4", "models.student.prior.num_prompts=32", "sft.epochs=1",
            "sft.batch_size=16", "eval.n=2", "eval.k=[1,2]", "models.student.tiny.hidden_size=64",
            "models.student.tiny.num_heads=2", "models.student.tiny.num_kv_heads=2",
            "models.student.tiny.intermediate_size=128"]

    def experiment(scratch: Path) -> str:
        return finish(pear_ray("run", str(ROOT / "jobs" / "pear-vs-sft.yaml"), *tiny, "--run-dir", url,
                               env={**os.environ, **s3.env(PEAR_RAY_SCRATCH=str(scratch))}))

    first = experiment(tmp_path / "first")
    objects = s3.objects(prefix)
    assert {"report.md", "summary.json", "wall_seconds.json", "seed0/state.json", "seed1/eval/sft-token.parquet",
            "seed1/models/sft-token/model.safetensors"} <= set(objects)
    assert any(name.startswith("priors/") and name.endswith("model.safetensors") for name in objects)
    summary = s3.read(f"{prefix}/summary.json")
    again = experiment(tmp_path / "second")
    assert "prior: done in an earlier run" in again and again.count("INFO sft/token: done in an earlier run") == 2
    assert "prior sft" not in again and "sft-token:" not in again  # no training bar: nothing trained
    assert s3.read(f"{prefix}/summary.json") == summary
    assert len(json.loads(s3.read(f"{prefix}/wall_seconds.json"))) == 2  # both invocations
    assert f"report: {url}/report.md" in again and f"report: {url}/report.md" in first
