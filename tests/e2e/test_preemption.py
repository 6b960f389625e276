"""Preemption drills on the local autoscaling cluster (tests/support/autoscaling.py: Ray's own autoscaler with its
fake multi-node provider, the node types of cluster/node_types.yaml): a node that holds learner ranks or rollout
actors, launched by the autoscaler for the job, is drained (Ray's preemption notice, with a deadline, after which the
node is killed as a cloud would) or killed without notice in the middle of a job, and the job finishes with the
uninterrupted run's results: every step logged once, the same losses, samples and final weights. Where the job's
actors move, the autoscaler launches the node they wait for.

Everything is started and stopped by the harness alone: never `ray stop`, which would stop every Ray cluster of the
user.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import load_file
from support.autoscaling import AutoscalingCluster
from support.cli import ROOT, finish, pear_ray, steps, stop_group
from support.learner import write_scored_sft_rows
from support.provider.reclaimable_provider import NODE_DISKS_ENV

SMOKE = str(ROOT / "jobs" / "smoke.yaml")
DEADLINE_S = 30  # notice given before a drained node is killed (Ray's own on SIGTERM: 30 s)


def run_job(cluster: AutoscalingCluster, *args: str) -> subprocess.Popen:
    """`pear-ray run` as a driver connected to the cluster."""
    return pear_ray("run", SMOKE, *args, env=cluster.client_env(RAY_ADDRESS=cluster.gcs_address))


def watch(process: subprocess.Popen, until, what: str, timeout: float = 300):
    """Poll `until()` while the job runs; its first true value."""
    deadline = time.monotonic() + timeout
    while not (found := until()):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_group(process)
            raise AssertionError(f"the job ended or ran out of time before {what}:\n{process.stdout.read()[-4000:]}")
        time.sleep(0.2)
    return found


def node_running(cluster: AutoscalingCluster, actor_class: str, besides: str | None = None):
    """A poll for a node (other than `besides`) where an actor of that class lives."""
    return lambda: next(iter(cluster.nodes_running(actor_class) - {besides}), None)


def wait_until_gone(cluster: AutoscalingCluster, actor_class: str, timeout: float = 60) -> None:
    """No actor of that class is left on the cluster (an earlier job's is on its way out)."""
    deadline = time.monotonic() + timeout
    while cluster.nodes_running(actor_class):
        assert time.monotonic() < deadline, f"a {actor_class} of an earlier job is still there"
        time.sleep(0.5)


def weights(run_dir: Path, model: str) -> dict[str, np.ndarray]:
    return load_file(str(run_dir / "models" / model / "model.safetensors"))


def assert_same_weights(run_dir: Path, reference: Path, model: str) -> None:
    ours, theirs = weights(run_dir, model), weights(reference, model)
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-7, err_msg=name)


def assert_same_steps(run_dir: Path, reference: Path, stage: str, *, besides: tuple[str, ...] = ()) -> list[dict]:
    """Every step of `stage` logged once, as in the reference run, with its figures (but for durations and
    `besides`: how the run got there)."""
    ours, theirs = steps(run_dir, stage), steps(reference, stage)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == list(range(1, len(theirs) + 1))
    for got, record in zip(ours, theirs, strict=True):
        for name in record.keys() - {"time", "stage", "variant", *besides}:
            if not name.endswith(("_seconds", "_busy")):
                assert got[name] == pytest.approx(record[name], rel=1e-5, abs=1e-6), (stage, record["step"], name)
    return ours


def drill_row(**figures) -> None:
    """One row of the drills' table, on the test's output (pytest -s shows it)."""
    print("DRILL", json.dumps(figures))


# ------------------------------------------------------------------ a rollout node drained mid-map

# A driver on the cluster: a pool of three actors (one on each rollout node the autoscaler launches for them) maps
# items that take half a second each; it asks the test to drain the second actor's node (a 30 s deadline: its calls in
# flight may finish there) after 3 results, the third's (a 2 s deadline: too near to finish anything) after 8, and
# reports where each item ran.
POOL_DRILL = """
import json, sys, time
from dataclasses import asdict

import ray

from pear_ray.actors.pool import ActorPool, batch_stats
from pear_ray.runtime import init_ray


@ray.remote(num_cpus=0.1, resources={"rollout": 1})
class Worker:
    @ray.method(num_returns=2)
    def work(self, item, seconds):
        started = time.perf_counter()
        time.sleep(seconds)
        return item * 10, batch_stats(1, 1, started, node=ray.get_runtime_context().get_node_id())


def drain(node, deadline_s):
    print("drain", node, deadline_s, flush=True)
    assert sys.stdin.readline() == "drained\\n"


init_ray()
pool = ActorPool.start(lambda slot: Worker.remote(), 3, min_size=1)
kept, first, second = (ray.get(pool.slots[slot].ready) for slot in range(3))
results = []
for index, ref, stats in pool.map("work", range(20), seconds=0.5):
    results.append([index, ray.get(ref), stats["node"]])
    if len(results) == 3:
        drain(first, 30)
    elif len(results) == 8:
        drain(second, 2)
print(json.dumps({"results": results, "stats": asdict(pool.stats), "nodes": [kept, first, second],
                  "slots": {slot: member.node for slot, member in pool.slots.items()},
                  "leaving": len(pool.members.leaving)}))
"""


@pytest.mark.slow  # about 30 s on a cluster; tests/unit/test_draining.py covers the pool leaving a draining node
def test_a_rollout_node_drained_mid_map_gets_no_new_work_and_its_calls_finish_or_run_elsewhere():
    with AutoscalingCluster(max_workers={"rollout": 3, "learner": 0}) as cluster:
        started = time.monotonic()
        driver = subprocess.Popen([sys.executable, "-c", POOL_DRILL], text=True,
                                  env=cluster.client_env(RAY_ADDRESS=cluster.gcs_address),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        output = []
        for line in driver.stdout:
            output.append(line)
            if line.startswith("drain "):
                _, node, deadline_s = line.split()
                cluster.drain(node, int(deadline_s))
                driver.stdin.write("drained\n")
                driver.stdin.flush()
        assert driver.wait(timeout=120) == 0, "".join(output)
        seconds = time.monotonic() - started
    report = json.loads(next(line for line in reversed(output) if line.startswith("{")))  # after Ray's own lines
    results, stats = report["results"], report["stats"]
    kept, first, second = report["nodes"]
    assert len({kept, first, second}) == 3  # the autoscaler launched a node for each actor
    assert sorted(index for index, _, _ in results) == list(range(20))  # every item once
    assert all(value == index * 10 for index, value, _ in results)
    assert [node for _, _, node in results[3:8]].count(first) >= 1  # its calls in flight finished there
    assert {node for _, _, node in results[-8:]} == {kept}  # after both notices, new work went to the node left
    assert stats["resubmitted"] >= 1  # the last node's calls in flight, given up at once, ran on the node left
    assert stats["actors_drained"] == stats["actors_dropped"] == 2 and stats["actors_replaced"] == 0
    assert list(report["slots"].values()) == [kept] and report["leaving"] == 0  # both left and went
    drill_row(node="rollout", phase="pool map", notice=True, steps_lost=0, batches_rerun=stats["resubmitted"],
              identical=True, seconds=round(seconds, 1))


# ------------------------------------------------------------------ a learner node drained mid-SFT

ROWS, BATCH, EPOCHS, CHECKPOINT_EVERY = 32, 4, 12, 50  # 96 SFT steps (~12 s here), one checkpoint at step 50


@pytest.fixture(scope="module")
def scored_data(tmp_path_factory) -> Path:
    """SFT rows that already carry behaviour log-probs, so the score stage only copies them (no vLLM)."""
    return write_scored_sft_rows(tmp_path_factory.mktemp("data") / "sft.jsonl", ROWS)


@pytest.fixture(scope="module")
def learner_cluster():
    """An autoscaling cluster that launches learner nodes (up to two) for the learner's rank, and no rollout node."""
    with AutoscalingCluster(max_workers={"learner": 2, "rollout": 0}) as cluster:
        yield cluster


def sft_job(data: Path, run_dir: Path | str) -> list[str]:
    return ["stages=[score,sft]", f"data.sft={data}", "models.behavior=null", "score.teacher_sft_steps=0",
            f"sft.batch_size={BATCH}", f"sft.epochs={EPOCHS}", f"sft.checkpoint_every={CHECKPOINT_EVERY}",
            "resources.learner.resources={learner: 1}", "--run-dir", str(run_dir)]


@pytest.mark.slow  # about 2 minutes: two SFT runs, a learner node launched for each and one for the move
def test_a_learner_node_drained_mid_sft_costs_no_step(learner_cluster, scored_data, tmp_path):
    reference, run_dir = tmp_path / "reference", tmp_path / "drill"
    started = time.monotonic()
    finish(run_job(learner_cluster, *sft_job(scored_data, reference)))
    reference_seconds = time.monotonic() - started
    wait_until_gone(learner_cluster, "LearnerWorker")

    started = time.monotonic()
    process = run_job(learner_cluster, *sft_job(scored_data, run_dir))
    drained = watch(process, node_running(learner_cluster, "LearnerWorker"), "the learner rank started")
    watch(process, lambda: (run_dir / "metrics.jsonl").is_file() and len(steps(run_dir, "sft")) >= 10, "SFT step 10")
    learner_cluster.drain(drained, DEADLINE_S)  # the learner sees it within a second
    output = finish(process)
    seconds = time.monotonic() - started

    moved = re.search(r"is draining .*; stopped after step (\d+), checkpointed there; starting the stage again on "
                      r"other nodes", output)
    assert moved, output[-5000:]
    stopped, resumed = int(moved.group(1)), int(re.search(r"sft-token: resuming at step (\d+)", output).group(1))
    first, second = re.findall(r"learner group up: .*, on node\(s\) (\w+)", output)
    assert first == drained and second != drained  # the new group is on a node the autoscaler launched for it
    assert resumed == stopped < ROWS // BATCH * EPOCHS  # no step trained twice: nothing lost
    assert_same_steps(run_dir, reference, "sft")
    assert_same_weights(run_dir, reference, "sft-token")
    drill_row(node="learner", phase="sft", notice=True, notice_at_step=stopped, steps_lost=stopped - resumed,
              lost_without_notice=stopped % CHECKPOINT_EVERY, identical=True, seconds=round(seconds, 1),
              uninterrupted_seconds=round(reference_seconds, 1))


# ------------------------------------------------------------------ a rollout node drained or killed mid-RL

RL_STEPS = 12
# What differs between a run whose rollout actor moved and one whose did not, but not its results: the pool's counts,
# samples regenerated because a new actor started on the start weights, the two engines' log-prob agreement.
POOL_FIGURES = ("rollout_actors_lost", "rollout_batches_rerun", "stale_regenerated", "mismatch_max", "mismatch_mean")


def own_disks(s3, disks: Path) -> dict[str, str]:
    """Every node's environment on a cluster whose nodes have disks of their own (a folder each under `disks`: the
    head's `head`, the others' `node<N>`) and reach the bucket, as a cloud's image and instance role give it."""
    return s3.env(PEAR_RAY_SCRATCH=str(disks / "head"), **{NODE_DISKS_ENV: str(disks)})


@pytest.fixture(scope="module")
def node_disks(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("disks")


@pytest.fixture(scope="module")
def rollout_cluster(s3, node_disks):
    """An autoscaling cluster whose head holds the learner, and that launches rollout nodes (up to two: the one
    taken away and its replacement) for the rollout actor; each node with a disk of its own."""
    with AutoscalingCluster(max_workers={"rollout": 2, "learner": 0}, node_env=own_disks(s3, node_disks)) as cluster:
        yield cluster


def rl_job(run_dir: Path) -> list[str]:
    """RL straight from the tiny student, every step trained (its rewards may all be equal), one rollout actor."""
    return ["stages=[rl]", f"rl.steps={RL_STEPS}", "rl.prompts_per_step=4", "rl.group_size=4", "rl.checkpoint_every=4",
            "rl.drop_constant_groups=false", "rl.save_rollouts=true", "sampling.max_tokens=16",
            "resources.rollout={num_actors: 1, num_cpus: 0.5, resources: {rollout: 1}}", "--run-dir", str(run_dir)]


@pytest.fixture(scope="module")
def rl_reference(rollout_cluster, tmp_path_factory) -> tuple[Path, float]:
    """The uninterrupted run's folder, and the seconds it took."""
    run_dir = tmp_path_factory.mktemp("rl") / "reference"
    started = time.monotonic()
    finish(run_job(rollout_cluster, *rl_job(run_dir)))
    seconds = time.monotonic() - started
    wait_until_gone(rollout_cluster, "RolloutWorker")
    return run_dir, seconds


def samples(run_dir: Path, step: int) -> list[list[int]]:
    return pq.read_table(run_dir / "rollouts" / "rl-token" / f"step-{step:06d}.parquet").column("response_ids").to_pylist()


def rollout_drill(cluster: AutoscalingCluster, reference: Path, run_dir: Path, take_away) -> tuple[str, list[dict], float]:
    """Run RL, take the rollout actor's node away with `take_away(node_id)` after step 3, then check the run ends
    with the reference's results, the rollouts on another node; returns the output, the RL rows and the seconds the
    run took."""
    started = time.monotonic()
    process = run_job(cluster, *rl_job(run_dir))
    watch(process, lambda: (run_dir / "metrics.jsonl").is_file() and len(steps(run_dir, "rl")) >= 3, "RL step 3")
    gone = watch(process, node_running(cluster, "RolloutWorker"), "the rollout actor started")
    take_away(gone)
    watch(process, node_running(cluster, "RolloutWorker", besides=gone), "a rollout actor on another node")
    output = finish(process)
    seconds = time.monotonic() - started
    print("\n".join(line for line in output.splitlines() if "WARNING" in line))
    rows = assert_same_steps(run_dir, reference, "rl", besides=POOL_FIGURES)
    for step in range(1, RL_STEPS + 1):
        assert samples(run_dir, step) == samples(reference, step), step
    assert_same_weights(run_dir, reference, "rl-token")
    assert "rl-token: resuming" not in output  # the learner never restarted
    return output, rows, seconds


@pytest.mark.slow  # about two minutes: two RL runs
def test_a_rollout_node_drained_mid_rl_hands_its_work_to_another(rollout_cluster, rl_reference, tmp_path):
    reference, reference_seconds = rl_reference
    output, rows, seconds = rollout_drill(rollout_cluster, reference, tmp_path / "drill",
                                          lambda node: rollout_cluster.drain(node, DEADLINE_S))
    assert re.search(r"rollout actor 0 is on a draining node \(\d+ calls to finish there\); replacing it", output)
    assert "lost (" not in output  # it left; it was not lost
    drill_row(node="rollout", phase="rl", notice=True, steps_lost=0, batches_rerun=rows[-1]["rollout_batches_rerun"],
              identical=True, seconds=round(seconds, 1), uninterrupted_seconds=round(reference_seconds, 1))


@pytest.mark.slow  # about two minutes: two RL runs
def test_a_rollout_node_killed_mid_rl_costs_no_step(rollout_cluster, rl_reference, tmp_path):
    reference, reference_seconds = rl_reference
    output, rows, seconds = rollout_drill(rollout_cluster, reference, tmp_path / "drill", rollout_cluster.kill_node)
    assert re.search(r"rollout actor 0 lost \(Actor(Unavailable|Died)Error\); replacing it", output)
    drill_row(node="rollout", phase="rl", notice=False, steps_lost=0, batches_rerun=rows[-1]["rollout_batches_rerun"],
              identical=True, seconds=round(seconds, 1), uninterrupted_seconds=round(reference_seconds, 1))


# ------------------------------------------------------------------ the whole cluster gone

def scratch_copy(machine: Path, url: str) -> Path:
    """Where a run folder in the bucket is cached on a machine whose scratch is `machine`."""
    return machine / url.replace("://", "/", 1)


@pytest.mark.slow  # about 3 minutes: three SFT runs on two autoscaling clusters
def test_a_run_whose_whole_cluster_went_resumes_on_a_new_one_from_the_bucket(s3, scored_data, tmp_path):
    """The run folder in a bucket (an S3 server on loopback, its endpoint and credentials in every node's environment
    as a cloud's instance role would give them); the cluster, driver included, goes at once after the SFT checkpoint;
    the same command on a new cluster, whose machine has nothing local, ends with the uninterrupted run's steps and
    weights."""
    bucket = s3.create_bucket("drills")
    reference, url = f"s3://{bucket}/reference", f"s3://{bucket}/drill"

    def job(cluster: AutoscalingCluster, run_url: str, machine: str) -> subprocess.Popen:
        env = cluster.client_env(RAY_ADDRESS=cluster.gcs_address, **s3.env(PEAR_RAY_SCRATCH=str(tmp_path / machine)))
        return pear_ray("run", SMOKE, *sft_job(scored_data, run_url), env=env)

    learner_only = {"learner": 1, "rollout": 0}

    def checkpointed() -> bool:
        return "latest" in s3.objects(f"{bucket}/drill/checkpoints/sft-token")

    with AutoscalingCluster(max_workers=learner_only, node_env=own_disks(s3, tmp_path / "first-disks")) as first:
        started = time.monotonic()
        finish(job(first, reference, "reference"))
        reference_seconds = time.monotonic() - started
        wait_until_gone(first, "LearnerWorker")
        started = time.monotonic()
        process = job(first, url, "first")
        watch(process, checkpointed, "the checkpoint in the bucket")
        stop_group(process)  # the head machine goes with the driver on it, then the rest of the cluster
    trained_before = len(steps(scratch_copy(tmp_path / "first", url), "sft"))  # the first machine's own log
    with AutoscalingCluster(max_workers=learner_only, node_env=own_disks(s3, tmp_path / "second-disks")) as second:
        output = finish(job(second, url, "second"))
    seconds = time.monotonic() - started
    assert f"sft-token: resuming at step {CHECKPOINT_EVERY}" in output, output[-3000:]
    resumed, expected = scratch_copy(tmp_path / "second", url), scratch_copy(tmp_path / "reference", reference)
    assert_same_steps(resumed, expected, "sft")
    assert_same_weights(resumed, expected, "sft-token")
    # The driver's export came through the bucket from the learner node's disk, where the rank wrote it.
    written = [model_file(disk, url, "sft-token") for disk in (tmp_path / "second-disks").glob("node*")]
    exported = model_file(tmp_path / "second", url, "sft-token").read_bytes()
    assert [file.read_bytes() for file in written if file.is_file()] == [exported]
    drill_row(node="every node", phase="sft", notice=False, steps_lost=trained_before - CHECKPOINT_EVERY,
              identical=True, seconds=round(seconds, 1), uninterrupted_seconds=round(reference_seconds, 1))


# ------------------------------------------------------------------ nodes with disks of their own

def model_file(disk: Path, url: str, model: str) -> Path:
    return scratch_copy(disk, url) / "models" / model / "model.safetensors"


@pytest.mark.slow  # about a minute: one RL run
def test_an_rl_run_in_a_bucket_on_nodes_with_disks_of_their_own_ends_as_a_local_one(rollout_cluster, rl_reference,
                                                                                     node_disks, s3, tmp_path):
    """The run folder in a bucket, and no two processes on different nodes share a disk: the driver's machine, the
    head (the learner, the reference scorer) and the rollout node each cache it in a scratch folder of their own, so
    a process finds what another wrote only through the bucket: the student the driver built, the export the
    learner wrote. The run ends with the results of the same run into a local folder."""
    reference, _ = rl_reference
    url, driver = f"s3://{s3.create_bucket('cloud')}/rl", tmp_path / "driver"
    finish(pear_ray("run", SMOKE, *rl_job(url), env=rollout_cluster.client_env(
        RAY_ADDRESS=rollout_cluster.gcs_address, **s3.env(PEAR_RAY_SCRATCH=str(driver)))))
    run_dir = scratch_copy(driver, url)
    assert_same_steps(run_dir, reference, "rl", besides=POOL_FIGURES)
    for step in range(1, RL_STEPS + 1):
        assert samples(run_dir, step) == samples(reference, step), step
    assert_same_weights(run_dir, reference, "rl-token")
    built = model_file(driver, url, "student").read_bytes()
    fetched = [disk.name for disk in sorted(node_disks.iterdir()) if model_file(disk, url, "student").is_file()]
    assert "head" in fetched and any(name.startswith("node") for name in fetched), fetched  # learner, rollout node
    for name in fetched:
        assert model_file(node_disks / name, url, "student").read_bytes() == built, name
    exported = model_file(node_disks / "head", url, "rl-token").read_bytes()  # written by the learner, on the head
    assert exported == model_file(driver, url, "rl-token").read_bytes()
    assert exported == s3.read("cloud/rl/models/rl-token/model.safetensors")
