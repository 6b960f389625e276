"""Multi-turn rollouts (RolloutWorker.episodes) on both engines, in real Ray: token-exact trajectories turn by turn,
failing environments counted while the other episodes play on, seeds that do not depend on what shares a call, and
the context carried forward (prefix caching) measured. One actor of each backend for the module."""

import numpy as np
import pyarrow as pa
import pytest
import ray
from support.environments import KIND, STEP_REWARD
from transformers import AutoTokenizer

from pear_ray.config import EnvironmentConfig
from pear_ray.data import schema
from pear_ray.engines.transformers_engine import TransformersEngine
from pear_ray.environments import observation_ids
from pear_ray.environments.base import ENV_ERROR, ENV_TIMEOUT
from pear_ray.environments.episodes import turn_seed
from pear_ray.tasks.build import with_environment

TOL = 1e-4
TURN_TOKENS = 6
MAX_TURNS = 3
OBSERVATION = "ok"
# vLLM's CPU build caches prefixes in whole 128-token blocks: one prompt longer than a block shows its hits
LONG_QUESTION = "How many times does the letter 'r' appear in \"strawberry\"? " * 10

@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def prompts(tokenizer, questions, misbehave=()):
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False) for q in questions]
    metadata = [f'{{"misbehave": "{m}"}}' if m else None for m in [*misbehave, *[None] * len(questions)]]
    return pa.table({schema.ID: [f"q{i}" for i in range(len(ids))], schema.PROMPT: questions, schema.PROMPT_IDS: ids,
                     schema.GROUP_ID: np.arange(len(ids)), schema.METADATA: metadata[:len(ids)]})


def environment(step_timeout_s=5.0):
    config = EnvironmentConfig(kind=KIND, max_turns=MAX_TURNS, step_timeout_s=step_timeout_s,
                               args={"observation": OBSERVATION, "hang_s": 60})
    return with_environment(None, config)


def episodes(actor, table, **kwargs):
    kwargs = {"environment": environment(), "seed": 5, "max_tokens": TURN_TOKENS, "ignore_eos": True} | kwargs
    out, stats = actor.episodes.remote(table, **kwargs)
    return ray.get(out), ray.get(stats)


def test_turns_and_observations_are_the_ids_sampled_and_written(rollout, tokenizer):
    table = prompts(tokenizer, ["What is 17 + 25?", LONG_QUESTION])
    out, stats = episodes(rollout, table, n=2)
    assert out.column(schema.ID).to_pylist() == ["q0/0", "q0/1", "q1/0", "q1/1"]
    assert out.column(schema.GROUP_ID).to_pylist() == [0, 0, 1, 1]
    assert out.column(schema.FINISH_REASON).to_pylist() == ["length"] * 4
    assert out.column(schema.REWARD).to_pylist() == [MAX_TURNS * STEP_REWARD] * 4
    assert (stats["env_errors"], stats["env_timeouts"]) == (0, 0)
    samples = out.to_pylist()
    starts = [turn_starts(sample[schema.POLICY_MASK]) for sample in samples]
    assert [len(turns) for turns in starts] == [MAX_TURNS] * 4 and all(turns[0] == 0 for turns in starts)
    for turn in range(MAX_TURNS):
        # each turn's span is what the engine samples, fresh, from the context before it with the turn's seed (one
        # call for the four samples: generate seeds prompt g with seed + n * g, so group ids 0 + the seeds give them)
        contexts = [s[schema.PROMPT_IDS] + s[schema.RESPONSE_IDS][:turns[turn]] for s, turns in zip(samples, starts)]
        seeds = [turn_seed(5 + 2 * s[schema.GROUP_ID] + int(s[schema.ID].split("/")[1]), turn) for s in samples]
        fresh, _ = rollout.generate.remote(pa.table({schema.PROMPT_IDS: contexts, schema.GROUP_ID: seeds}), seed=0,
                                           max_tokens=TURN_TOKENS, ignore_eos=True)
        for sample, turns, row in zip(samples, starts, ray.get(fresh).to_pylist()):
            span = slice(turns[turn], turns[turn] + TURN_TOKENS)
            assert sample[schema.RESPONSE_IDS][span] == row[schema.RESPONSE_IDS]
            assert np.allclose(sample[schema.ROLLOUT_LOGPROBS][span], row[schema.ROLLOUT_LOGPROBS], atol=TOL)
            assert sample[schema.POLICY_MASK][span] == [True] * TURN_TOKENS
    for sample, turns in zip(samples, starts):
        response, mask, logprobs = sample[schema.RESPONSE_IDS], sample[schema.POLICY_MASK], sample["rollout_logprobs"]
        for turn in range(MAX_TURNS - 1):  # between turns: the observation's ids, as observation_ids writes them
            written = observation_ids(tokenizer, f"{OBSERVATION} (turn {turn + 1})")
            env = slice(turns[turn] + TURN_TOKENS, turns[turn + 1])
            assert response[env] == written
            assert mask[env] == [False] * len(written) and logprobs[env] == [0.0] * len(written)
        assert turns[-1] + TURN_TOKENS == len(response) == len(mask) == len(logprobs)  # nothing after the last turn
        group = sample[schema.GROUP_ID]
        # the text route drifts: the conversation written as chat messages (the policy's turns decoded) and encoded
        # again is not the trajectory the policy sampled
        texts = [tokenizer.decode(response[start:start + TURN_TOKENS], skip_special_tokens=True) for start in turns]
        messages = [{"role": "user", "content": table.column(schema.PROMPT)[group].as_py()}]
        for turn, text in enumerate(texts):
            messages.append({"role": "assistant", "content": text})
            if turn + 1 < len(texts):
                messages.append({"role": "tool", "content": f"{OBSERVATION} (turn {turn + 1})"})
        again = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        assert again[:len(sample[schema.PROMPT_IDS])] == sample[schema.PROMPT_IDS]
        assert again[len(sample[schema.PROMPT_IDS]):] != response
    # scored teacher-forced (the mismatch probe, a behaviour model scoring episodes): the sampled log-probs at the
    # policy's tokens, and 0.0 at the environment's, as the schema keeps them
    scored, _ = rollout.score.remote(out, column=schema.BEHAVIOR_LOGPROBS)
    for sample, row in zip(samples, ray.get(scored).to_pylist()):
        mask = np.array(sample[schema.POLICY_MASK])
        scored_logprobs = np.array(row[schema.BEHAVIOR_LOGPROBS])
        assert (scored_logprobs[~mask] == 0.0).all()
        assert np.allclose(scored_logprobs[mask], np.array(sample[schema.ROLLOUT_LOGPROBS])[mask], atol=1e-3)


def test_failing_environments_end_their_episodes_and_are_counted(rollout, tokenizer):
    table = prompts(tokenizer, ["What is 1 + 2?", "What is 3 + 4?", "What is 5 + 6?"], misbehave=["raise", "hang"])
    out, stats = episodes(rollout, table, environment=environment(step_timeout_s=1.0))
    assert out.column(schema.FINISH_REASON).to_pylist() == [ENV_ERROR, ENV_TIMEOUT, "length"]
    assert out.column(schema.REWARD).to_pylist() == [0.0, 0.0, MAX_TURNS * STEP_REWARD]
    assert (stats["env_errors"], stats["env_timeouts"]) == (1, 1)
    lengths = [len(r) for r in out.column(schema.RESPONSE_IDS).to_pylist()]
    assert lengths[:2] == [TURN_TOKENS, TURN_TOKENS] and lengths[2] > MAX_TURNS * TURN_TOKENS


def test_same_seed_same_trajectories_whatever_shares_the_call(rollout, tokenizer):
    table = prompts(tokenizer, ["What is 1 + 2?", "What is 3 + 4?", "What is 5 + 6?"])
    together, _ = episodes(rollout, table, n=2)
    alone = [episodes(rollout, table.slice(i, 1), n=2)[0] for i in range(3)]
    assert together.column(schema.RESPONSE_IDS).to_pylist() == [
        r for part in alone for r in part.column(schema.RESPONSE_IDS).to_pylist()]
    assert together.column(schema.ID).to_pylist() == [i for part in alone for i in part.column(schema.ID).to_pylist()]


def test_topk_is_refused_by_name(rollout, tokenizer):
    with pytest.raises(ray.exceptions.RayTaskError, match="topk=2 is not supported"):
        episodes(rollout, prompts(tokenizer, ["What is 1 + 2?"]), topk=2)


def turn_starts(mask):
    return [s for s, policy in enumerate(mask) if policy and (s == 0 or not mask[s - 1])]


def test_the_context_is_carried_forward_not_prefilled_again(request, rollout, tokenizer):
    """Each later turn finds the context before it in the engine's prefix cache: vLLM (128-token blocks on CPU) reuses
    at least the long prompt's first block, the transformers engine everything it ran for the turn before (all but
    that turn's last id), so each turn prefills only the ids the last turn and the observation added."""
    table = prompts(tokenizer, [LONG_QUESTION])
    out, stats = episodes(rollout, table)
    prompt = table.column(schema.PROMPT_IDS)[0].as_py()
    contexts = [len(prompt) + start for start in turn_starts(out.column(schema.POLICY_MASK)[0].as_py())]
    assert len(contexts) == MAX_TURNS and len(prompt) > 128
    assert stats["prompt_tokens"] == sum(contexts)
    if request.node.callspec.params["rollout"] == "vllm":
        assert stats["cached_tokens"] >= 128 * (MAX_TURNS - 1)
    else:
        assert stats["cached_tokens"] >= sum(context + TURN_TOKENS - 1 for context in contexts[:-1])
    print(f"prefilled {stats['prompt_tokens'] - stats['cached_tokens']} of {stats['prompt_tokens']} context tokens")


def test_the_transformers_prefix_cache_gives_a_fresh_generation(tiny_model_dir):
    """Turn 2 of two episodes (and a prompt the cache has never seen) from the cached KV of turn 1, against an engine
    without a cache running the whole context: the same ids, log-probs within float round-off."""
    cached, fresh = TransformersEngine(tiny_model_dir), TransformersEngine(tiny_model_dir)
    fresh.prefixes = None
    first = [[1, 5, 6, 7, 8], [1, 9, 10]]
    turn_1 = cached.generate(first, seed=[3, 4], max_tokens=20, ignore_eos=True)
    contexts = [p + s[0].response_ids + [11, 12, 13] for p, s in zip(first, turn_1)] + [[1, 5, 6, 7, 20, 21]]
    turn_2 = cached.generate(contexts, seed=[7, 8, 9], max_tokens=10, ignore_eos=True)
    again = fresh.generate(contexts, seed=[7, 8, 9], max_tokens=10, ignore_eos=True)
    for got, want in zip(turn_2, again):
        assert got[0].response_ids == want[0].response_ids
        assert np.allclose(got[0].logprobs, want[0].logprobs, atol=TOL)
    # turn 1's KV came from the cache: its prompt and all its sampled ids but the last (never run); the third
    # prompt shares less than one block (16 ids) with anything and is prefilled whole
    assert cached.prefill_counts == {"prompt_tokens": 8 + sum(map(len, contexts)), "cached_tokens": 24 + 22}
