"""The DeepSpeed learner on Ray: data-parallel equivalence, log-probs, checkpoints, export, RL steps.

Real Ray (an embedded loopback instance started here), real DeepSpeed on CPU (gloo), the tiny Qwen2 model. Groups
are started lazily, once per module, and each training group takes the same first SFT step and RL step on the same
global batches when it starts, so the 1-rank vs 2-rank comparisons hold whatever tests are selected, in any order.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pytest
import ray
import torch
from ray.exceptions import RayActorError
from support.learner import OPTIMIZER, as_multi_turn, make_batch

from pear_ray.actors.learner import LearnerGroup, shard_bounds
from pear_ray.config import LearnerResources
from pear_ray.data import schema
from pear_ray.engines import checkpoints
from pear_ray.objectives import Grpo, PearSft, pear_loss

PEAR = PearSft(level="token", gamma=0.99)


FIRST_BATCH = make_batch(7, seed=1)  # 7 rows: uneven over 2 ranks (4 + 3)
FIRST_RL_BATCH = make_batch(7, seed=11)
# One minibatch (several would hold different rows at 1 and 2 ranks), two epochs, KL and TIS on.
FIRST_RL = Grpo(kl_coef=0.1, tis_cap=1.5, loss_aggregation="sequence-mean", epochs_per_batch=2)


@dataclass
class Learner:
    group: LearnerGroup
    first_step: dict | None  # the stats of the first SFT step on FIRST_BATCH
    weights_after_first_step: dict | None
    first_rl: dict | None  # then the stats of the first GRPO step on FIRST_RL_BATCH
    weights_after_first_rl: dict | None


@pytest.fixture(scope="module")
def learners(ray_cluster, tiny_model_dir):
    """learners(ranks, zero_stage, first_step=True) -> Learner, started once per module."""
    started: dict[tuple, Learner] = {}

    def get(ranks: int, zero_stage: int, first_step: bool = True) -> Learner:
        key = (ranks, zero_stage, first_step)
        if key not in started:
            # 0.25 CPU a rank: all 7 ranks fit beside the other modules' actors in the session's Ray
            resources = LearnerResources(num_ranks=ranks, zero_stage=zero_stage, num_cpus=0.25)
            group = LearnerGroup(tiny_model_dir, resources, **OPTIMIZER)
            first = [None] * 4
            if first_step:
                first[0] = group.step(ray.put(FIRST_BATCH), PEAR)
                first[1] = ray.get(group.weights_ref())
                first[2] = group.step(ray.put(FIRST_RL_BATCH), FIRST_RL)
                first[3] = ray.get(group.weights_ref())
            started[key] = Learner(group, *first)
        return started[key]

    yield get
    for learner in started.values():
        learner.group.shutdown()


def hf_model(model_dir, weights: dict | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if weights is not None:
        model.load_state_dict(weights)
    return model.eval()


def reference_token_logprobs(model, table: pa.Table) -> list[list[float]]:
    """Plain transformers, one unpadded row at a time: log_softmax(logits) gathered at the next token."""
    out = []
    with torch.no_grad():
        for prompt, response in zip(table.column(schema.PROMPT_IDS).to_pylist(),
                                    table.column(schema.RESPONSE_IDS).to_pylist()):
            ids = torch.tensor([prompt + response])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            picked = logp.gather(-1, ids[0, 1:, None])[:, 0]
            out.append(picked[len(prompt) - 1:].tolist())
    return out


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_shard_bounds_cover_rows_in_order():
    assert [shard_bounds(7, 2, r) for r in range(2)] == [(0, 4), (4, 7)]
    assert [shard_bounds(5, 3, r) for r in range(3)] == [(0, 2), (2, 4), (4, 5)]
    assert [shard_bounds(1, 2, r) for r in range(2)] == [(0, 1), (1, 1)]


def plain_pear_loss(model, table: pa.Table, **settings):
    """PEAR's loss over the whole batch by plain torch: pear_loss on [B, L] grids of response tokens under a mask,
    one row per sample, left-aligned; of a multi-turn row, its policy tokens alone, one after another."""
    policy = torch.from_numpy(schema.policy_tokens(table))
    logp = reference_token_logprobs(model, table)
    flat = torch.tensor([v for row in logp for v in row])[policy]
    behavior = torch.tensor(table.column(schema.BEHAVIOR_LOGPROBS).combine_chunks().flatten().to_numpy())[policy]
    lengths = [int(row.sum()) for row in torch.split(policy, [len(row) for row in logp])]

    def grid(values):
        return torch.nn.utils.rnn.pad_sequence(list(torch.split(values, lengths)), batch_first=True)

    return pear_loss(grid(flat), grid(behavior), grid(torch.ones(len(flat))).bool(), **settings)


def test_first_sft_step_loss_is_the_global_pear_loss(learners, tiny_model_dir):
    """World size 1: the reported loss is PEAR's loss over the whole batch, computed by plain torch."""
    one = learners(1, 0)
    expected, diag = plain_pear_loss(hf_model(tiny_model_dir), FIRST_BATCH, level=PEAR.level, gamma=PEAR.gamma)
    assert one.first_step["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert one.first_step["num_tokens"] == diag.num_tokens == schema.response_token_count(FIRST_BATCH)
    assert one.first_step["mean_weight"] == pytest.approx(diag.mean_weight, rel=1e-5)
    assert abs(diag.mean_weight - 1) > 0.05, "the test batch should give PEAR weights far from 1"


def test_sft_step_on_multi_turn_rows_trains_on_the_policy_tokens_only(learners, tiny_model_dir):
    """Rows whose responses hold the environment's tokens: the learner's log-probs are 0.0 there and the model's
    own at the policy's tokens, and a PEAR step's reported loss, token count and mean weight are those of each
    row's policy tokens alone, by plain torch (counting the environment's tokens would change them)."""
    group = learners(1, 0).group
    batch = as_multi_turn(make_batch(5, seed=13), seed=0)
    policy = schema.policy_tokens(batch)
    assert 0 < (~policy).sum() and schema.response_token_count(batch) == policy.sum()
    model = hf_model(tiny_model_dir, ray.get(group.weights_ref()))
    own = np.concatenate(reference_token_logprobs(model, batch))
    learner_logp = np.concatenate(ray.get(group.logprobs(ray.put(batch))).to_pylist())
    np.testing.assert_allclose(learner_logp, np.where(policy, own, 0.0), rtol=1e-4, atol=1e-5)
    settings = dict(level="block", block_size=3, gamma=PEAR.gamma)
    expected, diag = plain_pear_loss(model, batch, **settings)
    every_token, _ = plain_pear_loss(model, batch.drop([schema.POLICY_MASK]), **settings)
    assert abs(float(every_token) - float(expected)) > 0.01 * abs(float(expected))
    stats = group.step(ray.put(batch), PEAR.model_copy(update=settings))
    assert stats["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert stats["num_tokens"] == diag.num_tokens == policy.sum()
    assert stats["mean_weight"] == pytest.approx(diag.mean_weight, rel=1e-5)


def test_sft_step_normalized_by_the_weight_sum(learners, tiny_model_dir):
    """normalize weights, world size 1: the reported loss is sum w l / sum w over the batch, by plain torch."""
    group = learners(1, 0).group
    batch = make_batch(5, seed=12)
    model = hf_model(tiny_model_dir, ray.get(group.weights_ref()))
    settings = dict(level=PEAR.level, gamma=PEAR.gamma)
    by_weights, diag = plain_pear_loss(model, batch, **settings, normalize="weights")
    by_tokens, _ = plain_pear_loss(model, batch, **settings)
    assert abs(diag.mean_weight - 1) > 0.05  # so the two normalisations differ
    stats = group.step(ray.put(batch), PEAR.model_copy(update={"normalize": "weights"}))
    assert stats["loss"] == pytest.approx(float(by_weights), rel=1e-5)
    assert stats["loss"] == pytest.approx(float(by_tokens) / diag.mean_weight, rel=1e-5)


def test_frozen_target_reads_ref_logprobs(learners):
    """target_mode frozen: the PEAR log-ratio is ref - behaviour, whatever the current weights say."""
    batch = make_batch(4, seed=9)
    stats = learners(1, 0).group.step(ray.put(batch), PEAR.model_copy(update={"target_mode": "frozen"}))
    flat = lambda name: batch.column(name).combine_chunks().flatten().to_numpy()  # noqa: E731
    expected = float(np.mean(flat(schema.REF_LOGPROBS).astype(np.float64) - flat(schema.BEHAVIOR_LOGPROBS)))
    assert stats["mean_log_ratio"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_sft_step_on_two_ranks_matches_one_rank(learners, tiny_model_dir, zero_stage):
    one, two = learners(1, 0), learners(2, zero_stage)
    for key in ("loss", "grad_norm", "mean_weight", "ess", "frac_at_floor", "mean_log_ratio", "lr"):
        assert two.first_step[key] == pytest.approx(one.first_step[key], rel=1e-5, abs=1e-7), key
    assert two.first_step["num_tokens"] == one.first_step["num_tokens"]
    initial = hf_model(tiny_model_dir).state_dict()
    assert max_abs_diff(one.weights_after_first_step, initial) > 1e-4  # the step moved the weights
    assert max_abs_diff(two.weights_after_first_step, one.weights_after_first_step) < 1e-5
    checksums = two.group.parameter_checksums()
    assert checksums[0] == checksums[1]  # both ranks hold the same parameters


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_rl_step_on_two_ranks_matches_one_rank(learners, zero_stage):
    one, two = learners(1, 0), learners(2, zero_stage)
    assert one.first_rl["updates"] == two.first_rl["updates"] == 2
    for key, value in one.first_rl.items():
        assert two.first_rl[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert max_abs_diff(one.weights_after_first_rl, one.weights_after_first_step) > 1e-4
    assert max_abs_diff(two.weights_after_first_rl, one.weights_after_first_rl) < 2e-5


def test_logprobs_match_plain_transformers(learners, tiny_model_dir):
    """ZeRO-3 on 2 ranks, after a step; an uneven 5-row batch and a 1-row batch (rank 1 gets no rows)."""
    learner = learners(2, 3)
    weights = ray.get(learner.group.weights_ref())
    model = hf_model(tiny_model_dir)
    assert set(weights) == set(model.state_dict())  # HF names: what vLLM's load_weights expects
    model.load_state_dict(weights)
    for batch in (make_batch(5, seed=2), make_batch(1, seed=3)):
        ref = learner.group.logprobs(ray.put(batch))
        assert isinstance(ref, ray.ObjectRef)
        got = ray.get(ref).to_pylist()
        expected = reference_token_logprobs(model, batch)
        assert [len(row) for row in got] == [len(row) for row in expected]
        assert np.allclose(np.concatenate(got), np.concatenate(expected), atol=1e-5, rtol=0)


def test_checkpoint_resume_is_exact(learners, tmp_path):
    learner = learners(2, 2)
    group = learner.group
    sft_batch, rl_batch = make_batch(6, seed=4), make_batch(4, seed=5)
    rl = Grpo(kl_coef=0.05, tis_cap=2.0, minibatches=2)
    step_before = group.optimizer_steps
    tag = group.save_checkpoint(tmp_path / "ckpt", {"data_position": 7})

    def continue_training():
        sft = group.step(ray.put(sft_batch), PEAR)
        rl_stats = group.step(ray.put(rl_batch), rl)
        return sft, rl_stats, ray.get(group.weights_ref())

    first = continue_training()
    assert group.optimizer_steps == step_before + 3
    client_state = group.load_checkpoint(tmp_path / "ckpt")
    assert client_state == {"data_position": 7}
    assert group.optimizer_steps == step_before
    second = continue_training()
    assert second[0] == first[0]  # same loss, grad norm, lr (the cosine schedule was restored too)
    assert second[1] == first[1]
    assert max_abs_diff(second[2], first[2]) == 0.0
    assert group.load_checkpoint(tmp_path / "ckpt", tag) == {"data_position": 7}


def test_a_truncated_checkpoint_falls_back_to_the_previous_one(learners, tmp_path, caplog):
    """A checkpoint file cut short (a crash the filesystem did not order) does not match the manifest: the resume
    takes the checkpoint before it, with a warning, and continues exactly from there."""
    group = learners(2, 2).group
    ckpt = tmp_path / "ckpt"
    previous = group.save_checkpoint(ckpt, {"data_position": 1})
    step, weights = group.optimizer_steps, ray.get(group.weights_ref())
    group.step(ray.put(make_batch(6, seed=6)), PEAR)
    newest = group.save_checkpoint(ckpt, {"data_position": 2})
    optimizer = sorted((ckpt / newest).glob("*optim_states.pt"))[-1]  # the last rank's optimizer shard
    optimizer.write_bytes(optimizer.read_bytes()[:optimizer.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger=checkpoints.__name__):
        assert checkpoints.usable_tag(ckpt) == previous
    assert f"checkpoint {newest} in {ckpt} is unusable: {optimizer.name} has" in caplog.text
    assert f"resuming from the earlier checkpoint {previous}" in caplog.text
    assert group.load_checkpoint(ckpt) == {"data_position": 1}
    assert group.optimizer_steps == step
    assert max_abs_diff(ray.get(group.weights_ref()), weights) == 0.0


def test_a_checkpoint_that_fills_the_disk_fails_clearly_and_leaves_the_previous_one(learners, tmp_path):
    """ENOSPC partway through a checkpoint's files: the save fails naming the cause and what is left to resume
    from, its partial folder is removed (freeing the space), and the previous checkpoint still loads."""
    group = learners(1, 2).group
    ckpt = tmp_path / "ckpt"
    previous = group.save_checkpoint(ckpt, {"data_position": 1})
    step, weights = group.optimizer_steps, ray.get(group.weights_ref())
    group.step(ray.put(make_batch(6, seed=7)), PEAR)

    def disk_full(rank, full: bool) -> None:
        """In the rank's process: every torch.save writes 4 KiB, then finds the disk full (or, not `full`, works)."""
        import errno

        import torch

        def save(obj, path, *args, **kwargs):
            with open(path, "wb") as out:
                out.write(bytes(4096))
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        torch.save = save if full else torch.serialization.save

    [rank] = group.actors
    ray.get(rank.__ray_call__.remote(disk_full, True))
    try:
        with pytest.raises(OSError, match="could not be written") as failure:
            group.save_checkpoint(ckpt, {"data_position": 2})
    finally:
        ray.get(rank.__ray_call__.remote(disk_full, False))
    assert "No space left on device" in str(failure.value)
    assert f"the previous checkpoint {previous} is intact; a rerun resumes from it" in str(failure.value)
    assert sorted(path.name for path in ckpt.iterdir() if path.is_dir()) == [previous]
    assert checkpoints.usable_tag(ckpt) == previous
    assert group.load_checkpoint(ckpt) == {"data_position": 1}
    assert group.optimizer_steps == step
    assert max_abs_diff(ray.get(group.weights_ref()), weights) == 0.0


@pytest.mark.slow  # about 90 s on a busy 2-core machine: two groups of two ranks start
def test_a_checkpoint_one_rank_cannot_write_fails_at_once_and_a_new_group_resumes_from_the_previous_one(
        ray_cluster, tiny_model_dir, tmp_path):
    """Two ranks (ZeRO-2), and only rank 1's save fails (a folder holds its RNG file's name): rank 0 waits for it
    in the barrier for ever, yet the driver gets the error at once, naming the checkpoint and the intact previous
    one; shutdown kills the stuck rank, and a new group resumes exactly from the previous checkpoint."""
    resources = LearnerResources(num_ranks=2, zero_stage=2, num_cpus=0.25)
    ckpt = tmp_path / "ckpt"
    group = LearnerGroup(tiny_model_dir, resources, **OPTIMIZER)
    try:
        group.step(ray.put(FIRST_BATCH), PEAR)
        previous = group.save_checkpoint(ckpt, {"data_position": 1})
        step, weights = group.optimizer_steps, ray.get(group.weights_ref())
        group.step(ray.put(make_batch(6, seed=8)), PEAR)
        failing = f"step{group.optimizer_steps}"
        (ckpt / failing / "rng_rank1.pt").mkdir(parents=True)
        started = time.monotonic()
        with pytest.raises(OSError, match=f"checkpoint {failing} could not be written") as failure:
            group.save_checkpoint(ckpt, {"data_position": 2})
        assert time.monotonic() - started < 60
        assert "Is a directory" in str(failure.value)
        assert f"the previous checkpoint {previous} is intact; a rerun resumes from it" in str(failure.value)
        behind_the_barrier = group.actors[0].call.remote("optimizer_steps")
        assert ray.wait([behind_the_barrier], timeout=5)[0] == []  # rank 0 is stuck in the barrier
    finally:
        group.shutdown()
    with pytest.raises(RayActorError):
        ray.get(behind_the_barrier, timeout=60)
    assert checkpoints.usable_tag(ckpt) == previous

    resumed = LearnerGroup(tiny_model_dir, resources, **OPTIMIZER)
    try:
        assert resumed.load_checkpoint(ckpt) == {"data_position": 1}
        assert resumed.optimizer_steps == step
        assert max_abs_diff(ray.get(resumed.weights_ref()), weights) == 0.0
    finally:
        resumed.shutdown()


@pytest.mark.parametrize("ranks, zero_stage", [(1, 0), (2, 3)])
def test_export_hf_loads_with_identical_weights(learners, tiny_model_dir, tmp_path, ranks, zero_stage):
    from transformers import AutoTokenizer

    group = learners(ranks, zero_stage).group
    out = group.export_hf(tmp_path / "export")
    weights = ray.get(group.weights_ref())
    exported = hf_model(out).state_dict()
    assert max_abs_diff(exported, weights) == 0.0
    text = "What is 12 + 7? The answer is 19."
    assert AutoTokenizer.from_pretrained(out).encode(text) == AutoTokenizer.from_pretrained(tiny_model_dir).encode(text)


def test_rl_step_moves_weights_only_with_signal(learners):
    """ZeRO-1 on 2 ranks, fresh optimizer: zero advantages and no KL leave the weights exactly as they are."""
    group = learners(2, 1, first_step=False).group
    rl = Grpo(kl_coef=0.0, tis_cap=2.0, minibatches=2, epochs_per_batch=1)
    before = ray.get(group.weights_ref())
    stats = group.step(ray.put(make_batch(6, seed=6, advantage=0.0)), rl)
    assert max_abs_diff(ray.get(group.weights_ref()), before) == 0.0
    assert stats["updates"] == 2 and stats["loss"] == 0.0
    with_signal = rl.model_copy(update={"kl_coef": 0.1, "loss_aggregation": "sequence-mean"})
    stats = group.step(ray.put(make_batch(6, seed=7)), with_signal)
    assert max_abs_diff(ray.get(group.weights_ref()), before) > 1e-4
    assert stats["mean_ratio"] == pytest.approx(1.0, abs=0.05)
    assert stats["kl_ref"] > 0 and np.isfinite(stats["grad_norm"]) and stats["grad_norm"] > 0


def test_batch_smaller_than_the_group_is_refused(learners):
    group = learners(2, 2).group
    with pytest.raises(ValueError, match="cannot be split over 2 ranks"):
        group.step(ray.put(make_batch(1, seed=8)), PEAR)
    with pytest.raises(ValueError, match="minibatches"):
        group.step(ray.put(make_batch(3, seed=8)), Grpo(minibatches=2))


def test_missing_objective_column_is_named_before_the_forward_pass(learners):
    """Each objective declares its columns; a batch without one is refused with the column's name, and nothing
    trains."""
    group = learners(1, 0).group
    before = group.optimizer_steps
    batch = make_batch(4, seed=10)
    with pytest.raises(ValueError, match=r"pear_sft.*\['behavior_logprobs'\]"):
        group.step(ray.put(batch.drop_columns([schema.BEHAVIOR_LOGPROBS])), PEAR)
    with pytest.raises(ValueError, match=r"grpo.*\['ref_logprobs'\]"):
        group.step(ray.put(batch.drop_columns([schema.REF_LOGPROBS])), Grpo(kl_coef=0.1))
    assert group.optimizer_steps == before
    # level none reads no behaviour log-probs: canonical SFT trains on data without them
    stats = group.step(ray.put(batch.drop_columns([schema.BEHAVIOR_LOGPROBS])), PearSft(level="none"))
    assert stats["mean_weight"] == 1.0 and group.optimizer_steps == before + 1


def with_teacher_topk(table: pa.Table, k: int, seed: int) -> pa.Table:
    """A teacher_topk column: k random candidate ids per response token with log-softmax'd random log-probs."""
    rng = np.random.default_rng(seed)
    topk = []
    for response in table.column(schema.RESPONSE_IDS).to_pylist():
        rows = []
        for _ in response:
            ids = rng.choice(384, k, replace=False)
            logits = rng.normal(size=k)
            logprobs = np.sort(logits - np.log(np.exp(logits).sum()))[::-1]
            rows.append([{"id": int(i), "logprob": float(v)} for i, v in zip(ids, logprobs)])
        topk.append(rows)
    return schema.append_column(table, schema.TEACHER_TOPK, topk)


def test_pear_over_the_distillation_loss_matches_plain_torch(learners, tiny_model_dir):
    """World size 1: the step's loss is sum_t w_t KL_t / N, with the student's logits for token t taken at position
    t - 1 (plain transformers, one row at a time) and PEAR's weights from the student's log-probs of the data."""
    from pear_ray.objectives import pear_weights, topk_forward_kl

    group = learners(1, 0).group
    batch = with_teacher_topk(make_batch(4, seed=13), k=3, seed=13)
    model = hf_model(tiny_model_dir, ray.get(group.weights_ref()))
    objective = PearSft(level="token", gamma=0.9, base_loss="distill")
    total, tokens = 0.0, 0
    with torch.no_grad():
        for row in batch.to_pylist():
            prompt, response = row[schema.PROMPT_IDS], row[schema.RESPONSE_IDS]
            logits = model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1]
            student = torch.log_softmax(logits, -1)
            ids = torch.tensor([[c["id"] for c in token] for token in row[schema.TEACHER_TOPK]])
            teacher = torch.tensor([[c["logprob"] for c in token] for token in row[schema.TEACHER_TOPK]])
            mask = torch.ones(1, len(response), dtype=torch.bool)
            kl = topk_forward_kl(student.gather(-1, ids)[None], teacher[None], mask)
            logp = student.gather(-1, torch.tensor(response)[:, None])[:, 0]
            weights = pear_weights(logp[None], torch.tensor(row[schema.BEHAVIOR_LOGPROBS])[None], mask,
                                   level="token", gamma=0.9)
            total += float((weights * kl).sum())
            tokens += len(response)
    before = ray.get(group.weights_ref())
    stats = group.step(ray.put(batch), objective)
    assert stats["loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert stats["loss"] > 0 and stats["num_tokens"] == tokens
    # padded rows (-inf top-k off the response) leave the gradient finite, and the step trains
    assert np.isfinite(stats["grad_norm"]) and stats["grad_norm"] > 0
    assert max_abs_diff(ray.get(group.weights_ref()), before) > 1e-5


def test_a_non_finite_gradient_stops_the_step_loudly(learners):
    """fp32 has no loss scaling to skip a bad step: an objective whose gradient is infinite fails the step with
    the step named, rather than training on (a first distillation loss did so silently, with NaN gradients)."""
    from pathlib import Path

    from pear_ray.objectives import CustomObjective

    plugin = Path(__file__).parents[1] / "support" / "plugins" / "objective_example.py"
    group = learners(1, 1, first_step=False).group
    with pytest.raises(FloatingPointError, match="gradient norm is (inf|nan)"):
        group.step(ray.put(make_batch(2, seed=14)), CustomObjective(function=f"{plugin}:exploding"))
