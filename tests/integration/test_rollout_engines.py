"""The rollout engines on the tiny model, each held to the same contract: vLLM's (VllmEngine) and the transformers
loop's (TransformersEngine) log-probs against a plain transformers fp32 forward pass, generation, the sampling
distribution, reproducibility, in-place weight reload, and readable errors for bad model folders. One engine of each
kind for the module."""

import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pear_ray.config import TransformersOptions, VllmOptions
from pear_ray.engines.rollout_engine import EngineError
from pear_ray.engines.transformers_engine import TransformersEngine
from pear_ray.engines.vllm_engine import VllmEngine
from pear_ray.models import TinyModelSpec, build_tiny_model

TOL = 1e-4


ENGINES = {
    # no cap: a test asks for the whole vocabulary
    "vllm": lambda model: VllmEngine(model, VllmOptions(max_logprobs=-1), seed=0),
    "transformers": lambda model: TransformersEngine(model, TransformersOptions(), seed=0),
}


@pytest.fixture(scope="module", params=list(ENGINES))
def engine(request, tiny_model_dir):
    eng = ENGINES[request.param](tiny_model_dir)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def prompts(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    chat = tok.apply_chat_template([{"role": "user", "content": "What is 17 + 25?"}], add_generation_prompt=True,
                                   tokenize=True, return_dict=False)
    return [chat, tok.encode("How many times does the letter 'r' appear in \"strawberry\"?"), [5]]


def hf_distribution(model, prompt, response, temperature=1.0, top_p=1.0):
    """[len(response), vocab] log p(. | prompt, response_<t) from one transformers forward pass: log_softmax(logits /
    temperature), renormalised over the top-p nucleus (the most likely tokens until their mass reaches top_p)."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double() / temperature, dim=-1)
    sorted_logp, order = logp.sort(dim=-1, descending=True)
    mass_before = sorted_logp.exp().cumsum(-1) - sorted_logp.exp()
    nucleus = torch.zeros_like(logp, dtype=torch.bool).scatter(-1, order, mass_before < top_p)
    return torch.log_softmax(logp.masked_fill(~nucleus, -torch.inf), dim=-1)[len(prompt) - 1:-1]


def hf_logprobs(model, prompt, response, temperature=1.0, top_p=1.0):
    """log p(response_t | prompt, response_<t) under `hf_distribution`."""
    logp = hf_distribution(model, prompt, response, temperature, top_p)
    return logp.gather(1, torch.tensor(response)[:, None])[:, 0].tolist()


def assert_topk_matches(topk, logp, k):
    """vLLM's top-k of each position against torch.topk of the transformers distribution: same ids, same values."""
    assert len(topk) == len(logp)
    expected_logprobs, expected_ids = torch.topk(logp, k, dim=-1)
    for position, ids, logprobs in zip(topk, expected_ids.tolist(), expected_logprobs.tolist()):
        assert [token for token, _ in position] == ids
        assert max_diff([lp for _, lp in position], logprobs) < TOL


def max_diff(a, b):
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


def test_score_matches_transformers(engine, tiny_model_dir, prompts):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    responses = [[10, 200, 3, 3, 57], [300], list(range(40, 70))]
    scores = engine.score(prompts, responses)
    for p, r, s in zip(prompts, responses, scores):
        assert len(s) == len(r)
        assert max_diff(s, hf_logprobs(model, p, r)) < TOL


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_score_topk_matches_transformers(engine, tiny_model_dir, prompts, temperature):
    """The teacher's top-k when scoring: that of logits / temperature, as the log-probs scored with it."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    responses = [[10, 200, 3, 3, 57], [300], list(range(40, 70))]
    logprobs, topk = engine.score(prompts, responses, temperature=temperature, topk=8)
    assert logprobs == engine.score(prompts, responses, temperature=temperature)  # topk changes nothing else
    for p, r, row in zip(prompts, responses, topk):
        assert_topk_matches(row, hf_distribution(model, p, r, temperature), 8)


def test_score_rejects_empty_rows(engine, prompts):
    with pytest.raises(ValueError, match="row 1 has an empty response"):
        engine.score(prompts[:2], [[1, 2], []])
    with pytest.raises(ValueError, match="row 0 has an empty prompt"):
        engine.score([[]], [[1]])


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 1.0), (0.7, 0.8)])
def test_generate_logprobs_are_of_the_sampling_distribution(engine, tiny_model_dir, prompts, temperature, top_p):
    """The log-prob recorded with each sampled token is of the distribution that sampled it (after temperature and
    top-p), not of the raw model: what PEAR's behaviour log-probs and RL's importance ratios need."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    out = engine.generate(prompts, n=3, temperature=temperature, top_p=top_p, max_tokens=12, seed=7, ignore_eos=True)
    assert [len(samples) for samples in out] == [3, 3, 3]
    rows = [(p, s) for p, samples in zip(prompts, out) for s in samples]
    for p, s in rows:
        assert len(s.response_ids) == len(s.logprobs) == 12 and s.finish_reason == "length"
        assert max_diff(s.logprobs, hf_logprobs(model, p, s.response_ids, temperature, top_p)) < TOL
    # teacher-forced scores at the temperature (no top-p: scoring samples nothing) agree with the samples' own
    scores = engine.score([p for p, _ in rows], [s.response_ids for _, s in rows], temperature=temperature)
    for (p, s), sc in zip(rows, scores):
        assert max_diff(sc, hf_logprobs(model, p, s.response_ids, temperature)) < TOL
        if top_p == 1.0:
            assert max_diff(s.logprobs, sc) < TOL
    assert len({tuple(s.response_ids) for _, s in rows[:3]}) > 1  # n samples differ (seed + j per sample)


def test_generate_topk_is_of_the_sampling_distribution(engine, tiny_model_dir, prompts):
    """At generation the top-k is of the distribution that sampled (temperature and top-p applied), holds the sampled
    token's recorded log-prob whenever that token is in it, and asking for it changes no sample."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    kwargs = dict(n=2, temperature=0.7, top_p=0.9, max_tokens=12, seed=3, ignore_eos=True)
    plain = engine.generate(prompts, **kwargs)
    out = engine.generate(prompts, **kwargs, topk=8)
    hits = 0
    for p, samples, plain_samples in zip(prompts, out, plain):
        for s, s0 in zip(samples, plain_samples):
            assert (s.response_ids, s.logprobs, s0.topk) == (s0.response_ids, s0.logprobs, [])
            assert_topk_matches(s.topk, hf_distribution(model, p, s.response_ids, 0.7, 0.9), 8)
            for position, token, logprob in zip(s.topk, s.response_ids, s.logprobs):
                assert len(position) == 8
                assert [lp for _, lp in position] == sorted((lp for _, lp in position), reverse=True)
                if token in dict(position):
                    assert dict(position)[token] == logprob
                    hits += 1
    assert hits > 0  # the sampled token's entry was checked


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_a_full_vocabulary_topk_is_the_whole_distribution(engine, prompts, top_p):
    """k = the vocabulary: every token with probability > 0 once, summing to 1; top-p leaves out the tokens outside
    the nucleus rather than giving them -inf."""
    [samples] = engine.generate(prompts[:1], n=2, temperature=0.7, top_p=top_p, max_tokens=6, seed=2,
                                ignore_eos=True, topk=engine.vocab_size)
    _, [scored] = engine.score(prompts[:1], [samples[0].response_ids], temperature=0.7, topk=engine.vocab_size)
    for topk in [s.topk for s in samples] + ([scored] if top_p == 1.0 else []):
        for position in topk:
            ids, logprobs = zip(*position)
            assert len(set(ids)) == len(ids) and all(math.isfinite(lp) for lp in logprobs)
            assert (len(ids) == engine.vocab_size) == (top_p == 1.0)
            assert abs(torch.logsumexp(torch.tensor(logprobs, dtype=torch.float64), 0).item()) < 1e-4


def test_samples_follow_the_sampling_distribution(engine, tiny_model_dir, prompts):
    """The first tokens of 4000 samples of one prompt (temperature 0.7, top-p 0.8; 40 seeds x 100) against their
    probabilities: each frequent token within 4 standard deviations, none from outside the nucleus."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    out = engine.generate(prompts[:1] * 40, n=100, temperature=0.7, top_p=0.8, max_tokens=1,
                          seed=[100 * k for k in range(40)], ignore_eos=True)
    probs = hf_distribution(model, prompts[0], [0], 0.7, 0.8)[0].exp()
    first = [s.response_ids[0] for samples in out for s in samples]
    assert len(set(first)) > 3
    counts = torch.bincount(torch.tensor(first), minlength=len(probs)).double()
    assert counts[probs == 0].sum() == 0
    frequent = probs * 4000 > 20
    assert frequent.sum() > 3
    deviation = (counts - 4000 * probs)[frequent] / (4000 * probs * (1 - probs))[frequent].sqrt()
    assert deviation.abs().max() < 4


def test_generate_is_reproducible_with_seed(engine, prompts):
    a = engine.generate(prompts, n=2, max_tokens=10, seed=123)
    b = engine.generate(prompts, n=2, max_tokens=10, seed=123)
    c = engine.generate(prompts, n=2, max_tokens=10, seed=124)
    ids = lambda out: [[s.response_ids for s in samples] for samples in out]  # noqa: E731
    assert ids(a) == ids(b) and ids(a) != ids(c)
    assert all(s.finish_reason in ("stop", "length") for samples in a for s in samples)


def test_stop_token_ids(engine, prompts):
    first = engine.generate(prompts[:1], max_tokens=8, seed=5, ignore_eos=True)[0][0]
    stop = first.response_ids[2]
    cut = engine.generate(prompts[:1], max_tokens=8, seed=5, stop_token_ids=[stop])[0][0]
    assert cut.finish_reason == "stop" and cut.response_ids[-1] == stop
    assert cut.response_ids == first.response_ids[: first.response_ids.index(stop) + 1]


def test_update_weights_matches_perturbed_model(engine, tiny_model_dir, prompts):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    responses = [[10, 200, 3, 3, 57], [300, 4], list(range(40, 60))]
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    expected = [hf_logprobs(model, p, r) for p, r in zip(prompts, responses)]
    before = engine.score(prompts, responses)
    assert max(max_diff(b, e) for b, e in zip(before, expected)) > 100 * TOL  # really a different model
    version = engine.version
    try:
        assert engine.update_weights(model.state_dict().items()) == version + 1
        after = engine.score(prompts, responses)
        for a, e in zip(after, expected):
            assert max_diff(a, e) < TOL
        assert engine.health() == {"model_dir": str(tiny_model_dir), "version": version + 1, "alive": True}
    finally:  # later tests in this module see the original weights
        engine.update_weights(original.items())
    for a, b in zip(engine.score(prompts, responses), before):
        assert max_diff(a, b) < TOL


def test_update_weights_refuses_incomplete_or_misnamed_sets(engine, tiny_model_dir, prompts):
    # vLLM's reload would fail half-way (or load garbage into fused layers) and leave the engine unusable.
    state = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    before, version = engine.score(prompts, [[7, 8, 9]] * 3), engine.version
    bad_sets = {"unknown": [("module." + k, v) for k, v in state.items()], "missing": list(state.items())[:3],
                "wrong shapes": [(k, v[:-1] if k == "lm_head.weight" else v) for k, v in state.items()]}
    for what, weights in bad_sets.items():
        with pytest.raises(ValueError, match=f"{what} \\['"):
            engine.update_weights(weights)
    assert engine.version == version and engine.health()["alive"]
    assert engine.score(prompts, [[7, 8, 9]] * 3) == before


# The tests below start engines of their own: vLLM allows one live engine per process, so they come last and
# shut the module's engine down first (its fixture teardown is then a no-op).


@pytest.mark.parametrize("engine", ["vllm"], indirect=True)
def test_one_engine_per_process(engine, tiny_model_dir):
    with pytest.raises(EngineError, match="already runs one"):
        VllmEngine(tiny_model_dir)
    assert engine.health()["alive"]
    engine.shutdown()
    assert engine.health()["alive"] is False and "shut down" in engine.health()["error"]
    with pytest.raises(EngineError, match="shut down"):
        engine.generate([[1]])


def test_update_weights_with_tied_embeddings(engine, tmp_path_factory, prompts):
    # Qwen2.5-style tied head: vLLM CPU packs the LM head at start-up, so a reload must repack it.
    engine.shutdown()
    make = type(engine)
    tied_dir = build_tiny_model(TinyModelSpec(tie_embeddings=True), tmp_path_factory.mktemp("tied"))
    model = AutoModelForCausalLM.from_pretrained(tied_dir, dtype=torch.float32).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    eng = make(tied_dir)
    try:
        with torch.no_grad():
            model.model.embed_tokens.weight.add_(torch.randn_like(model.model.embed_tokens.weight) * 0.05)
        eng.update_weights(model.state_dict().items())  # includes lm_head.weight, which the checkpoint lacks
        responses = [[10, 200, 3], [300, 4], [40, 41, 42, 43]]
        for p, r, s in zip(prompts, responses, eng.score(prompts, responses)):
            assert max_diff(s, hf_logprobs(model, p, r)) < TOL
    finally:
        eng.shutdown()


def test_bad_model_folders_give_clear_errors(engine, tiny_model_dir, tmp_path):
    engine.shutdown()
    make = type(engine)
    with pytest.raises(EngineError, match="does not exist"):
        make(tmp_path / "missing")
    no_tok = tmp_path / "no_tokenizer"
    no_tok.mkdir()
    shutil.copy(tiny_model_dir / "config.json", no_tok)
    with pytest.raises(EngineError, match="no tokenizer files"):
        make(no_tok)
    with pytest.raises(EngineError, match="no config.json"):
        make(tmp_path)
    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny_model_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(EngineError, match=f"model folder {no_weights}: no weights"):
        make(no_weights)
