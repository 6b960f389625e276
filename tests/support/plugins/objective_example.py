"""An example plug-in objective (`rl.objective: {kind: custom, function: tests/plugins/objective_example.py:reinforce,
needs: [advantage], sampled: true}`): plain REINFORCE, -A log pi per response token, token-mean."""

from pear_ray.objectives import LossTerms, ObjectiveInputs, masked_sum


def reinforce(inputs: ObjectiveInputs, scale: float = 1.0) -> LossTerms:
    advantage = inputs.columns["advantage"].unsqueeze(1)
    total = -scale * masked_sum(advantage * inputs.logp, inputs.mask)
    tokens = float(inputs.mask.sum())
    return LossTerms(total, size=tokens, stats={"num_tokens": tokens,
                                                "logp_sum": float(masked_sum(inputs.logp.detach(), inputs.mask))})


def not_terms(inputs: ObjectiveInputs) -> float:
    return 0.0


def exploding(inputs: ObjectiveInputs) -> LossTerms:
    """A loss whose gradient is infinite, for the learner's refusal to step on it."""
    return LossTerms(masked_sum(inputs.logp, inputs.mask) * float("inf"), size=1.0)
