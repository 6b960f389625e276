"""AdapterWeights, what a learner sends the rollout engines for a LoRA policy version: made from a peft model, written
as a peft folder peft itself loads, plain LoRA only, and a small fraction of the model's bytes."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from pear_ray.engines.adapters import AdapterWeights


def peft_model(model_dir, **config):
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return get_peft_model(base, LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
                                           | config))


def test_an_adapter_is_a_small_fraction_of_the_model(tiny_model_dir):
    model = peft_model(tiny_model_dir, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"])
    adapter = AdapterWeights.of_peft_model(model)
    full = sum(t.numel() * t.element_size()
               for t in AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict().values())
    assert (adapter.r, adapter.alpha, adapter.dropout) == (4, 8, 0.0)
    assert len(adapter.tensors) == 2 * 7 * 2  # A and B, 7 modules, 2 layers
    # every linear layer at r = 4 on the 64-wide tiny model: ~5% of its bytes (r / width of a 64 x 64 layer, less
    # for the embeddings and head, which have none); at 7B and r = 16, ~0.6%
    assert adapter.nbytes * 10 < full


def test_save_writes_a_folder_peft_loads(tiny_model_dir, tmp_path):
    model = peft_model(tiny_model_dir)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    adapter = AdapterWeights.of_peft_model(model)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, adapter.save(tmp_path / "adapter"))
    assert loaded.peft_config["default"].r == 4 and loaded.peft_config["default"].lora_alpha == 8
    ids = torch.tensor([[1, 5, 9, 20]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("variant", [{"use_rslora": True}, {"use_dora": True}, {"rank_pattern": {"q_proj": 8}}])
def test_lora_variants_the_fields_do_not_describe_are_refused(tiny_model_dir, variant):
    with pytest.raises(ValueError, match="plain LoRA"):
        AdapterWeights.of_peft_model(peft_model(tiny_model_dir, **variant))
