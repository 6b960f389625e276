"""The objectives behind the learner's boundary, against hand-computed references on small tensors: top-k forward
KL (PEAR over a distillation loss), on-policy distillation, GRPO as loss terms, and plug-ins by import path."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pear_ray.objectives import (
    CustomObjective,
    Grpo,
    ObjectiveInputs,
    OnPolicyDistill,
    PearSft,
    pear_weights,
    policy_loss,
    topk_forward_kl,
)

PLUGIN = Path(__file__).parents[1] / "support" / "plugins" / "objective_example.py"
NEG_INF = float("-inf")


def test_topk_forward_kl_by_hand():
    """Row 0: a 3-candidate token and a 2-candidate one (third slot empty); row 1: one token, then padding. The
    teacher is renormalised over its candidates, the student (log-softmax over a 5-token vocabulary) is not."""
    teacher = torch.tensor([[[NEG_INF] * 3, [-0.5, -1.5, -2.0], [-0.2, -1.8, NEG_INF]],
                            [[NEG_INF] * 3, [-0.1, -3.0, -4.0], [NEG_INF] * 3]])
    vocab_logits = torch.tensor([[[0.0] * 5, [1.0, 2.0, 0.5, 3.0, -1.0], [3.0, 1.0, 7.0, 0.0, 0.0]],
                                 [[0.0] * 5, [0.0, 0.0, 0.0, 2.0, 2.0], [0.0] * 5]])
    student = torch.log_softmax(vocab_logits, -1)[..., :3]  # candidates are ids 0, 1, 2
    mask = torch.tensor([[False, True, True], [False, True, False]])

    def by_hand(lt, z):
        p = [math.exp(v) for v in lt]
        p = [v / sum(p) for v in p]
        q = [math.exp(v) / sum(math.exp(w) for w in z) for v in z[:len(p)]]
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))

    expected = torch.tensor([[0.0, by_hand([-0.5, -1.5, -2.0], [1.0, 2.0, 0.5, 3.0, -1.0]),
                              by_hand([-0.2, -1.8], [3.0, 1.0, 7.0, 0.0, 0.0])],
                             [0.0, by_hand([-0.1, -3.0, -4.0], [0.0, 0.0, 0.0, 2.0, 2.0]), 0.0]])
    got = topk_forward_kl(student, teacher, mask)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert (got >= 0).all()
    # zero exactly when the student's whole mass is the teacher's renormalised top-k
    renormalised = teacher - teacher.logsumexp(-1, keepdim=True)
    assert topk_forward_kl(renormalised.nan_to_num(neginf=-80.0), teacher, mask).abs().max() < 1e-5


def test_topk_forward_kl_pulls_mass_into_the_teachers_support_with_finite_gradients():
    """A student ranking the candidates as the teacher does but keeping mass elsewhere still pays (-log q(S)); the
    gradient raises the candidates, and padding (-inf everywhere, as data/tensors.py lays it out) gives 0, not NaN."""
    teacher = torch.tensor([[[NEG_INF] * 2, [math.log(0.8), math.log(0.2)]]])
    mask = torch.tensor([[False, True]])
    logits = torch.tensor([[[0.0, 0.0, 0.0], [math.log(0.8), math.log(0.2), 3.0]]], requires_grad=True)
    loss = topk_forward_kl(torch.log_softmax(logits, -1)[..., :2], teacher, mask)
    assert float(loss[0, 1].detach()) == pytest.approx(-math.log(1 / (1 + math.exp(3.0))), rel=1e-5)
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[0, 1, 0] < 0 and logits.grad[0, 1, 1] < 0 < logits.grad[0, 1, 2]  # into the support
    assert logits.grad[0, 0].abs().sum() == 0  # nothing off the response


def inputs_for(logp, mask, columns, logp_old=None, candidates=None):
    return ObjectiveInputs(logp=logp, mask=mask, columns=columns, logp_old=logp_old,
                           logprobs_at=(lambda ids: candidates) if candidates is not None else None)


def test_pear_over_the_distillation_loss_weights_the_kl_as_it_weights_the_nll():
    torch.manual_seed(0)
    logp = -torch.rand(2, 4) * 3
    behavior = logp + 0.2 * torch.randn(2, 4)
    mask = torch.tensor([[False, True, True, True], [False, True, True, False]])
    teacher = torch.log_softmax(torch.randn(2, 4, 3), -1)
    student = torch.log_softmax(torch.randn(2, 4, 5), -1)[..., :3].requires_grad_()
    objective = PearSft(level="token", gamma=0.9, base_loss="distill")
    assert objective.columns() == ("behavior_logprobs", "teacher_topk")
    terms = objective.loss(inputs_for(logp, mask, {"behavior_logprobs": behavior,
                                                   "teacher_topk_ids": torch.zeros(2, 4, 3, dtype=torch.long),
                                                   "teacher_topk_logprobs": teacher}, candidates=student))
    weights = pear_weights(logp, behavior, mask, level="token", gamma=0.9)
    expected = (weights * topk_forward_kl(student, teacher, mask))[mask].sum()
    torch.testing.assert_close(terms.total, expected)
    assert terms.size == float(mask.sum())
    assert terms.total.requires_grad  # through the student's log-probs, not through the weights
    nll = PearSft(level="token", gamma=0.9).loss(inputs_for(logp, mask, {"behavior_logprobs": behavior}))
    torch.testing.assert_close(nll.total, (weights * -logp)[mask].sum())


def test_on_policy_distillation_advantage_is_teacher_minus_student():
    """At the first update logp == logp_old (ratio 1, nothing clipped): each token's loss is -A_t, with
    A_t = log pi_teacher - log pi_student_old (+ reward_coef x the sample's advantage)."""
    logp_old = torch.tensor([[0.0, -1.0, -2.0, -0.5], [0.0, -0.3, -0.7, 0.0]])
    teacher = torch.tensor([[0.0, -0.5, -2.5, -0.5], [0.0, -1.3, -0.2, 0.0]])
    mask = torch.tensor([[False, True, True, True], [False, True, True, False]])
    logp = logp_old.clone().requires_grad_()
    columns = {"teacher_logprobs": teacher, "advantage": torch.tensor([1.0, -2.0])}
    plain = OnPolicyDistill(tis_cap=None)
    assert plain.columns() == ("teacher_logprobs",) and plain.on_policy()
    terms = plain.loss(inputs_for(logp, mask, columns, logp_old=logp_old))
    advantage = teacher - logp_old
    assert float(terms.total.detach()) == pytest.approx(-float(advantage[mask].sum()))
    assert terms.size == 5
    assert plain.report(terms.stats)["reverse_kl"] == pytest.approx(float((logp_old - teacher)[mask].mean()))
    with_reward = OnPolicyDistill(tis_cap=None, reward_coef=0.5)
    assert "advantage" in with_reward.columns()
    terms = with_reward.loss(inputs_for(logp, mask, columns, logp_old=logp_old))
    shifted = advantage + 0.5 * columns["advantage"].unsqueeze(1)
    assert float(terms.total.detach()) == pytest.approx(-float(shifted[mask].sum()))
    terms.total.backward()  # d(-A r)/d logp = -A at r = 1
    torch.testing.assert_close(logp.grad, torch.where(mask, -shifted, 0.0))


def test_grpo_terms_divided_by_their_size_are_policy_loss_plus_the_kl_penalty():
    torch.manual_seed(1)
    logp_old = -torch.rand(3, 5)
    logp = (logp_old + 0.1 * torch.randn(3, 5)).requires_grad_()
    ref, rollout = logp_old + 0.05 * torch.randn(3, 5), logp_old + 0.05 * torch.randn(3, 5)
    mask = torch.rand(3, 5) > 0.3
    columns = {"advantage": torch.tensor([1.0, -0.5, 2.0]), "ref_logprobs": ref, "rollout_logprobs": rollout}
    for aggregation in ("token-mean", "sequence-mean"):
        objective = Grpo(kl_coef=0.1, loss_aggregation=aggregation)
        terms = objective.loss(inputs_for(logp, mask, columns, logp_old=logp_old))
        expected, stats = policy_loss(logp, logp_old, columns["advantage"], mask, eps_high=0.28,
                                      logp_rollout=rollout, aggregation=aggregation)
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        rows = mask.any(1)
        kl_mean = (kl[mask].mean() if aggregation == "token-mean"
                   else torch.stack([kl[i][mask[i]].mean() for i in range(3) if rows[i]]).mean())
        torch.testing.assert_close(terms.total / terms.size, expected + 0.1 * kl_mean)
        report = objective.report(terms.stats)
        assert report["clip_fraction"] == pytest.approx(stats.clip_fraction)
        assert report["kl_ref"] == pytest.approx(float(kl.detach()[mask].mean()), rel=1e-6)


def test_custom_objective_loads_by_path_and_its_terms_are_used():
    objective = CustomObjective(function=f"{PLUGIN}:reinforce", args={"scale": 2.0}, needs=["advantage"],
                                sampled=True)
    logp = torch.tensor([[0.0, -1.0, -2.0]], requires_grad=True)
    mask = torch.tensor([[False, True, True]])
    terms = objective.loss(inputs_for(logp, mask, {"advantage": torch.tensor([0.5])}))
    assert float(terms.total.detach()) == pytest.approx(-2.0 * 0.5 * (-3.0))
    assert objective.columns() == ("advantage",) and objective.on_policy()
    assert objective.report({"num_tokens": 4.0, "logp_sum": -6.0}) == {"num_tokens": 4.0, "logp_sum": -1.5}


def test_custom_objective_errors_name_the_problem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="no function 'missing'"):
        CustomObjective(function=f"{PLUGIN}:missing")
    with pytest.raises(ValueError, match="not of the form"):
        CustomObjective(function="reinforce")
    with pytest.raises(ValueError, match="no file"):
        CustomObjective(function="plugins/objective_example.py:reinforce")  # relative to where the job is loaded
    bad = CustomObjective(function=f"{PLUGIN}:not_terms")
    with pytest.raises(TypeError, match="returned float, not LossTerms"):
        bad.loss(inputs_for(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), {}))
