"""benchmarks/capacity_model.py: its parameter counts against transformers and peft, its sync estimate's direction.

The model's figures rest on counting the right tensors; a wrong count (a missed bias, a tied head counted twice, a
LoRA factor of the wrong width) would skew every table silently, so the counts are checked against the libraries
that build the real thing."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "capacity_model.py"
_spec = importlib.util.spec_from_file_location("capacity_model", SCRIPT)
cm = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = cm  # dataclasses look their module up while the class is built
_spec.loader.exec_module(cm)

GQA_TINY = cm.Qwen2Shape("gqa-tiny", 128, 2, 4, 2, 256, 384, tie_embeddings=False)  # k/v narrower than q


def qwen2_config(shape):
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=shape.hidden_size, num_hidden_layers=shape.num_layers,
                       num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
                       intermediate_size=shape.intermediate_size, vocab_size=shape.vocab_size,
                       tie_word_embeddings=shape.tie_embeddings)


def build(shape, device: str = "cpu") -> torch.nn.Module:
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return Qwen2ForCausalLM(qwen2_config(shape))


@pytest.mark.parametrize("shape", [cm.TINY_SHAPE, GQA_TINY,
                                   cm.Qwen2Shape("tied-tiny", 64, 2, 2, 1, 128, 384, tie_embeddings=True)],
                         ids=lambda s: s.name)
def test_full_weights_are_the_transformers_state_dict_and_two_bytes_a_parameter_in_bf16(shape):
    model = build(shape).to(torch.bfloat16)
    params = dict(model.named_parameters())  # a tied head appears once
    assert {name: tuple(p.shape) for name, p in params.items()} == cm.full_tensor_shapes(shape)
    assert sum(p.numel() * p.element_size() for p in params.values()) == cm.full_param_count(shape) * 2
    assert cm.SYNC_BYTES_PER_PARAM == 2


@pytest.mark.parametrize("name", list(cm.QWEN2_SHAPES))
def test_qwen25_shapes_count_what_transformers_builds(name):
    shape = cm.QWEN2_SHAPES[name]
    model = build(shape, device="meta")  # no memory, no init
    assert sum(p.numel() for p in model.parameters()) == cm.full_param_count(shape)


@pytest.mark.parametrize("rank", [8, 16])
@pytest.mark.parametrize("targets", [cm.LORA_TARGETS, ("q_proj", "v_proj")], ids=["all", "q+v"])
def test_lora_count_and_tensors_are_what_peft_creates(rank, targets):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(build(GQA_TINY), peft.LoraConfig(r=rank, target_modules=list(targets)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == cm.lora_param_count(GQA_TINY, rank, targets)
    adapter = peft.get_peft_model_state_dict(model)  # what an adapter-only sync would send
    assert {name: tuple(t.shape) for name, t in adapter.items()} == cm.lora_tensor_shapes(GQA_TINY, rank, targets)


def test_sync_estimates_grow_with_bytes_and_shrink_with_bandwidth():
    layouts = [cm.Layout(rollout_gpus=4, learner_gpus=4), cm.Layout(rollout_gpus=64, learner_gpus=8)]
    sizes = [1e6, 1e8, 1e10]
    links = [100 * cm.GBIT, 400 * cm.GBIT, 1e13]
    for layout in layouts:
        for link in links:
            store = [cm.object_store_sync_seconds(b, layout, 1, link) for b in sizes]
            collective = [cm.broadcast_sync_seconds(b, layout, link) for b in sizes]
            assert store == sorted(store) and len(set(store)) == len(store)
            assert collective == sorted(collective) and len(set(collective)) == len(collective)
    across = cm.Layout(rollout_gpus=64, learner_gpus=8)  # between nodes the link matters, strictly
    for estimate in (lambda link: cm.object_store_sync_seconds(1e9, across, 1, link),
                     lambda link: cm.broadcast_sync_seconds(1e9, across, link)):
        seconds = [estimate(link) for link in links]
        assert seconds == sorted(seconds, reverse=True) and len(set(seconds)) == len(seconds)
        # what the link adds over an infinitely fast one is inverse in its bandwidth: 4x the link, a quarter
        network = [estimate(link) - estimate(math.inf) for link in links[:2]]
        assert math.isclose(network[0] / network[1], links[1] / links[0])


def test_a_lora_sync_is_a_small_share_of_the_full_one():
    shape = cm.QWEN2_SHAPES["0.5B"]
    assert cm.lora_param_count(shape, 8) / cm.full_param_count(shape) < 0.01  # the goal at r=8
    assert cm.lora_param_count(shape, 16) / cm.full_param_count(shape) > 0.01  # but not at r=16 over all seven
