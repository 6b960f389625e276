"""Actors lost for real in real Ray: a rollout or reference actor that hangs (SIGSTOP: alive, holding its work,
answering nothing) is killed after call_timeout_s and replaced, in `map` and in `call_all`; a queue of batches
answered one after another is no hang; a reference actor that dies (SIGKILL) is replaced and scores the batch
again, in the pool and mid-RL."""

import contextlib
import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pytest
import ray
from support.rl import run_rl
from transformers import AutoTokenizer

from pear_ray.actors.pool import ActorPool
from pear_ray.actors.roles import reference_actor, reference_pool, rollout_pool
from pear_ray.config import ActorResources, RolloutResources
from pear_ray.data import schema
from pear_ray.data.io import encode_prompt

REFERENCE = ActorResources(num_cpus=0.25)


@pytest.fixture(scope="module")
def prompt_refs(ray_cluster, tiny_model_dir) -> list[ray.ObjectRef]:
    """Six two-prompt batches in the object store."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = [encode_prompt(tokenizer, f"What is {a} + {a + 1}?") for a in range(12)]
    table = pa.table({"id": [f"q{i}" for i in range(12)], schema.PROMPT_IDS: ids})
    return [ray.put(table.slice(i, 2)) for i in range(0, 12, 2)]


@pytest.fixture(scope="module")
def scored_refs(ray_cluster, tiny_model_dir) -> list[ray.ObjectRef]:
    """Forty (prompt, response) batches of four rows, for the reference actor to score."""
    rng = np.random.default_rng(0)
    batches = [pa.table({schema.ID: [f"{b}/{r}" for r in range(4)],
                         schema.PROMPT_IDS: rng.integers(3, 300, (4, 6)).tolist(),
                         schema.RESPONSE_IDS: rng.integers(3, 300, (4, 5)).tolist()}) for b in range(40)]
    return [ray.put(batch) for batch in batches]


def process_of(actor) -> psutil.Process:
    """The actor's process; asked of the actor, so the answer waits for the work queued on it."""
    return psutil.Process(ray.get(actor.__ray_call__.remote(lambda self: os.getpid())))


@pytest.fixture
def hang():
    """SIGSTOP an actor's process: it stays alive and holds its work, but answers nothing. Whatever the test's
    outcome, no stopped process is left behind."""
    stopped = []

    def stop(process: psutil.Process) -> psutil.Process:
        process.send_signal(signal.SIGSTOP)
        stopped.append(process)
        return process

    yield stop
    for process in stopped:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def assert_gone(process: psutil.Process, timeout: float = 60) -> None:
    """The process ended: ray.kill reaches a stopped process too."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.1)
    raise AssertionError(f"the hung actor's process {process.pid} was not killed")


def map_hanging_the_first_actor(pool: ActorPool, hang, method: str, refs,
                                **kwargs) -> tuple[list[int], psutil.Process]:
    """Map over `refs`, SIGSTOPping slot 0's actor once the first batch is back (it has more queued); returns the
    indices in the order they came back and the stopped process."""
    seen, process = [], process_of(pool.slots[0].actor)
    for index, batch_ref, _ in pool.map(method, refs, **kwargs):
        seen.append(index)
        assert ray.get(batch_ref).num_rows > 0
        if len(seen) == 1:
            hang(process)
    return seen, process


@pytest.mark.slow  # about 35 s: hangs waited out; dead actors stay in the default suite
def test_a_hung_actor_is_killed_and_its_batches_rerun_in_map_and_in_call_all(ray_cluster, tiny_model_dir,
                                                                            scored_refs, hang, caplog):
    """An elastic pool (three reference actors, at least one) lets each hung actor go rather than wait for a new
    one to start; the slow test below shows a fixed pool replacing a hung (vLLM) actor."""
    pool = ActorPool.start(lambda slot: reference_actor(tiny_model_dir, REFERENCE), size=3, min_size=1, call_timeout_s=3,
                     role="reference")
    try:
        seen, stopped = map_hanging_the_first_actor(pool, hang, "score", scored_refs[:12])
        assert sorted(seen) == list(range(12))  # every batch exactly once
        assert pool.stats.actors_dropped == 1 and pool.stats.resubmitted >= 1
        assert_gone(stopped)
        assert re.search(r"reference actor 0 lost \(hung: no answer for \d+ s\); going on with 2 actors", caplog.text)

        stopped = hang(process_of(pool.slots[1].actor))
        started = time.monotonic()
        [(scored, _)] = pool.call_all("score", scored_refs[0])
        assert time.monotonic() - started >= 3
        assert list(pool.slots) == [2] and pool.stats.actors_dropped == 2
        assert scored.num_rows == 4
        assert_gone(stopped)
    finally:
        pool.shutdown()


def test_a_queue_answered_one_batch_after_another_is_no_hang(ray_cluster, tiny_model_dir, scored_refs):
    """Every batch queued at once on one actor takes longer in all than call_timeout_s, yet each answers in time:
    the silence counts from the last answer, not from submission."""
    pool = ActorPool.start(lambda slot: reference_actor(tiny_model_dir, REFERENCE), size=1, call_timeout_s=0.5)
    try:
        ray.get(pool.slots[0].ready)
        started = time.monotonic()
        seen = [index for index, _, _ in pool.submit("score", scored_refs * 5)]
        assert time.monotonic() - started > pool.call_timeout_s  # else the test proves nothing
        assert sorted(seen) == list(range(len(scored_refs) * 5))
        assert pool.stats.actors_replaced == 0 and pool.stats.resubmitted == 0
    finally:
        pool.shutdown()


def test_a_dead_reference_actor_is_replaced_and_scores_the_batch_again(ray_cluster, tiny_model_dir, scored_refs):
    pool = reference_pool(tiny_model_dir, REFERENCE)
    try:
        [(_, first, _)] = pool.map("score", scored_refs[:1], column=schema.REF_LOGPROBS)
        process_of(pool.slots[0].actor).kill()  # between two calls, as the OOM killer would
        [(_, again, _)] = pool.map("score", scored_refs[:1], column=schema.REF_LOGPROBS)
        assert pool.stats.actors_replaced == 1 and pool.stats.resubmitted == 1
        assert ray.get(again).equals(ray.get(first))  # a frozen model on CPU: the same scores
    finally:
        pool.shutdown()


@pytest.mark.slow  # one to three minutes: vLLM actors started four times
def test_a_hung_rollout_actor_is_killed_and_replaced_in_map_and_in_call_all(ray_cluster, tiny_model_dir,
                                                                            prompt_refs, hang):
    resources = RolloutResources(num_actors=2, num_cpus=0.25, call_timeout_s=10)
    pool = rollout_pool(tiny_model_dir, resources, seed=0)
    try:
        seen, stopped = map_hanging_the_first_actor(pool, hang, "generate", prompt_refs, n=2, max_tokens=4, seed=0)
        assert sorted(seen) == list(range(len(prompt_refs)))
        assert pool.stats.actors_replaced == 1 and pool.stats.resubmitted >= 1
        assert_gone(stopped)

        stopped = hang(process_of(pool.slots[1].actor))
        versions = pool.call_all("set_policy_version", 3)
        assert versions == [3, 3] and pool.stats.actors_replaced == 2
        assert_gone(stopped)
    finally:
        pool.shutdown()


def kill_the_reference_actor_after_step(run_dir: Path, step: int, killed: list[int]) -> threading.Thread:
    """A thread that SIGKILLs this test's ReferenceWorker process once RL has logged `step` steps."""
    def watch():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            metrics = run_dir / "metrics.jsonl"
            if metrics.is_file() and metrics.read_text().count('"stage": "rl"') >= step:
                for child in psutil.Process().children(recursive=True):  # this test's Ray only
                    if " ".join(child.cmdline()).startswith("ray::ReferenceWorker"):
                        child.kill()
                        killed.append(child.pid)
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow  # about two minutes: two RL runs
def test_rl_goes_on_when_its_reference_actor_dies_and_gives_the_same_results(ray_cluster, tiny_model_dir,
                                                                              tmp_path):
    kl = {"objective": {"kl_coef": 0.1}, "steps": 4, "save_rollouts": False}
    uninterrupted, _ = run_rl(tmp_path / "uninterrupted", tiny_model_dir, **kl)
    killed = []
    watcher = kill_the_reference_actor_after_step(tmp_path / "interrupted", 1, killed)
    interrupted, _ = run_rl(tmp_path / "interrupted", tiny_model_dir, **kl)
    watcher.join()
    assert killed, "no reference actor was killed"
    assert [r["step"] for r in interrupted] == [r["step"] for r in uninterrupted] == [1, 2, 3, 4]
    assert interrupted[-1]["reference_actors_replaced"] == 1 and uninterrupted[-1]["reference_actors_replaced"] == 0
    for a, b in zip(interrupted, uninterrupted, strict=True):
        assert a["reward"] == b["reward"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-9)
        assert a["kl_ref"] == pytest.approx(b["kl_ref"], rel=1e-6, abs=1e-9)
