"""LoRA adapters as policy versions (`update_adapter`) on both rollout engines, on the tiny model: base + adapter
scores and samples as the same engine loaded with the merged model does, a new version replaces the one before
without the engine holding more, a bad adapter is refused and the one before kept, and full weights drop the
adapter. One engine of each kind for the module; and a rollout actor taking an adapter through Ray."""

import pyarrow as pa
import pytest
import ray
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from pear_ray.actors.rollout import RolloutWorker
from pear_ray.config import TransformersOptions, VllmOptions
from pear_ray.data import schema
from pear_ray.engines.adapters import AdapterWeights
from pear_ray.engines.rollout_engine import EngineError
from pear_ray.engines.transformers_engine import TransformersEngine
from pear_ray.engines.vllm_engine import VllmEngine

TOL = 1e-5  # fp32 engines: base + adapter against the merged weights
TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
PROMPTS = [[1, 5, 9, 20, 33, 44], [300, 12], list(range(40, 60))]
RESPONSES = [[10, 200, 3, 3, 57], [300, 4], list(range(60, 80))]

ENGINES = {
    "vllm": lambda model: VllmEngine(model, VllmOptions(max_lora_rank=8), seed=0),
    "transformers": lambda model: TransformersEngine(model, TransformersOptions(), seed=0),
}


@pytest.fixture(scope="module", params=list(ENGINES))
def engine(request, tiny_model_dir):
    eng = ENGINES[request.param](tiny_model_dir)
    yield eng
    eng.shutdown()


def make_adapter(model_dir, seed: int, r: int = 4) -> tuple[AdapterWeights, dict[str, torch.Tensor]]:
    """A peft adapter on the tiny model with random non-zero B (peft starts B at zero: no change), and the state dict
    of base + that adapter merged."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    return AdapterWeights.of_peft_model(model), model.merge_and_unload().state_dict()


def hf_scores(model_dir, state: dict[str, torch.Tensor]) -> list[list[float]]:
    """Teacher-forced log-probs of RESPONSES under a plain transformers forward of the folder's model with `state`."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.load_state_dict(state)
    scores = []
    for prompt, response in zip(PROMPTS, RESPONSES, strict=True):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1], -1)
        scores.append(logp.gather(1, torch.tensor(response)[:, None])[:, 0].tolist())
    return scores


def max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for row_a, row_b in zip(a, b, strict=True) for x, y in zip(row_a, row_b, strict=True))


def outputs(engine) -> dict:
    """What a policy version shows: scores at two temperatures (with top-k), and seeded samples."""
    samples = engine.generate(PROMPTS, n=2, temperature=0.8, max_tokens=10, seed=11, ignore_eos=True)
    return {"scores": engine.score(PROMPTS, RESPONSES),
            "scores at 0.7": engine.score(PROMPTS, RESPONSES, temperature=0.7, topk=4),
            "sample ids": [[s.response_ids for s in row] for row in samples],
            "sample logprobs": [s.logprobs for row in samples for s in row]}


def assert_same_policy(got: dict, expected: dict) -> None:
    assert got["sample ids"] == expected["sample ids"]
    assert max_diff(got["sample logprobs"], expected["sample logprobs"]) < TOL
    assert max_diff(got["scores"], expected["scores"]) < TOL
    (logprobs, topk), (expected_logprobs, expected_topk) = got["scores at 0.7"], expected["scores at 0.7"]
    assert max_diff(logprobs, expected_logprobs) < TOL
    assert [[[t for t, _ in pos] for pos in row] for row in topk] == [
        [[t for t, _ in pos] for pos in row] for row in expected_topk]


def adapters_held(engine) -> int:
    """LoRA adapters the engine holds: vLLM's loaded ones (and their folders), the transformers model's."""
    if isinstance(engine, VllmEngine):
        folders = list(engine._adapter_dir.iterdir())
        assert len(folders) == len(engine.llm.llm_engine.list_loras())
        return len(folders)
    return len(getattr(engine.model, "peft_config", {}))


def test_adapter_versions_serve_as_the_merged_models(engine, tiny_model_dir):
    """Each adapter version scores and samples (same seed) as the engine does with the merged weights; the second
    replaces the first; full weights afterwards drop the adapter."""
    base_state = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    base = outputs(engine)
    versions = [make_adapter(tiny_model_dir, seed) for seed in (1, 2)]
    merged = []
    for _, merged_state in versions:  # the reference: the same engine with each merged model's full weights
        engine.update_weights(merged_state.items())
        merged.append(outputs(engine))
    engine.update_weights(base_state.items())
    assert_same_policy(outputs(engine), base)
    assert max_diff(merged[0]["scores"], hf_scores(tiny_model_dir, versions[0][1])) < 1e-4  # a sound reference
    assert max_diff(merged[0]["scores"], base["scores"]) > 0.05  # the adapters change the model
    assert max_diff(merged[1]["scores"], merged[0]["scores"]) > 0.05

    for (adapter, _), expected in zip(versions, merged, strict=True):
        version = engine.version
        assert engine.update_adapter(adapter) == version + 1
        assert_same_policy(outputs(engine), expected)
        assert adapters_held(engine) == 1  # the version before is gone
        assert engine.health()["alive"]
    engine.update_weights(base_state.items())
    assert adapters_held(engine) == 0
    assert_same_policy(outputs(engine), base)


def test_a_bad_adapter_is_refused_and_the_one_before_kept(engine, tiny_model_dir):
    adapter, _ = make_adapter(tiny_model_dir, seed=3)
    engine.update_adapter(adapter)
    before, version = engine.score(PROMPTS, RESPONSES), engine.version
    renamed = AdapterWeights({name.replace("q_proj", "qq_proj"): t for name, t in adapter.tensors.items()},
                             adapter.r, adapter.alpha, adapter.target_modules)
    with pytest.raises((ValueError, EngineError), match="qq_proj"):
        engine.update_adapter(renamed)
    assert engine.version == version and adapters_held(engine) == 1
    assert engine.score(PROMPTS, RESPONSES) == before


@pytest.mark.parametrize("engine", ["vllm"], indirect=True)
def test_vllm_refuses_an_adapter_above_its_max_rank(engine, tiny_model_dir):
    adapter, _ = make_adapter(tiny_model_dir, seed=4, r=16)
    with pytest.raises(EngineError, match="greater than max_lora_rank 8"):
        engine.update_adapter(adapter)
    assert engine.health()["alive"]


def test_a_rollout_actor_takes_an_adapter_as_a_policy_version(ray_cluster, tiny_model_dir):
    """As a learner sends it: the adapter crosses to the actor's process, and the samples after it carry its version
    and score as the merged model does."""
    adapter, merged_state = make_adapter(tiny_model_dir, seed=5)
    merged = TransformersEngine(tiny_model_dir)
    merged.update_weights(merged_state.items())
    actor = ray.remote(RolloutWorker).options(num_cpus=0.25).remote(tiny_model_dir, seed=0,
                                                                     engine=TransformersOptions())
    try:
        assert ray.get(actor.update_adapter.remote(adapter, 7)) == 7
        samples, _ = actor.generate.remote(pa.table({schema.PROMPT_IDS: PROMPTS}), max_tokens=4, seed=1)
        samples = ray.get(samples)
        assert set(samples.column(schema.POLICY_VERSION).to_pylist()) == {7}
        scored, stats = actor.score.remote(samples)
        assert ray.get(stats)["policy_version"] == 7
        expected = merged.score(PROMPTS, samples.column(schema.RESPONSE_IDS).to_pylist())
        assert max_diff(ray.get(scored).column(schema.BEHAVIOR_LOGPROBS).to_pylist(), expected) < TOL
    finally:
        ray.kill(actor)
