"""LoRA's pure parts (engines/lora.py): the merged weights under the model's own names, the target modules' check,
and the config's limits. No Ray, no DeepSpeed: a tiny model wrapped by peft on the spot."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from pear_ray.config import LoraConfig
from pear_ray.engines.lora import (
    adaptable_modules,
    dropout_layers,
    dropout_on,
    hf_name,
    merged,
    missing_targets,
    with_adapters,
)
from pear_ray.models import TinyModelSpec, build_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(TinyModelSpec(), tmp_path_factory.mktemp("tiny"))


def adapted(model_dir, lora: LoraConfig):
    """The tiny model with adapters whose B is random too, so that merging changes every adapted weight."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = with_adapters(AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32), lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    return model


def test_merged_weights_are_peft_merge_and_unload_under_the_plain_names(model_dir):
    from transformers import AutoModelForCausalLM

    lora = LoraConfig(r=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"])
    model = adapted(model_dir, lora)
    live = {name: param.detach().clone() for name, param in model.named_parameters()}
    ours = dict(merged(model.named_parameters(), lora.scaling))
    assert all(torch.equal(param, live[name]) for name, param in model.named_parameters())  # nothing mutated
    expected = model.merge_and_unload().state_dict()
    plain = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).state_dict()
    assert ours.keys() == plain.keys()
    assert all(torch.equal(ours[name], expected[name]) for name in ours)  # the same operations, bit for bit
    changed = {name for name in ours if not torch.equal(ours[name], plain[name])}
    assert changed == {name for name in ours if name.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight"))}


def test_adapter_dropout_is_on_only_inside_dropout_on(model_dir):
    model = adapted(model_dir, LoraConfig(r=4, dropout=0.5)).eval()
    ids = torch.tensor([[5, 17, 42, 9]])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with dropout_on(dropout_layers(model)):
            dropped = [model(input_ids=ids).logits for _ in range(2)]
        after = model(input_ids=ids).logits
    assert not torch.equal(dropped[0], plain) and not torch.equal(dropped[0], dropped[1])
    assert torch.equal(after, plain)
    assert dropout_layers(adapted(model_dir, LoraConfig(r=4))) == []


def test_hf_name_strips_the_peft_wrapping():
    assert hf_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == \
        "model.layers.0.self_attn.q_proj.weight"
    assert hf_name("base_model.model.model.norm.weight") == "model.norm.weight"


def test_missing_targets_follow_peft_suffix_matching(model_dir):
    from transformers import AutoConfig

    names = adaptable_modules(AutoConfig.from_pretrained(model_dir))
    assert "model.layers.1.mlp.down_proj" in names and "model.norm" not in names
    assert missing_targets(names, ["q_proj", "self_attn.k_proj", "mlp.down_proj"]) == []
    assert missing_targets(names, ["q_proj", "qkv_proj", "norm", "proj"]) == ["qkv_proj", "norm", "proj"]


def test_config_limits_and_scale():
    assert LoraConfig(r=8, alpha=16).scaling == 2.0
    for bad in ({"r": 0}, {"alpha": 0}, {"dropout": 1.0}, {"target_modules": []}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            LoraConfig(**bad)
