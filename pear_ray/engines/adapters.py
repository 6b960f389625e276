"""A LoRA adapter as the learner sends it to the rollout engines (`RolloutEngine.update_adapter`): the adapter's
tensors and the few config fields that say where they go, so a policy version costs the adapter's bytes, not the
model's. What a learner rank makes cheaply from a peft model (`AdapterWeights.of_peft_model`); what an engine makes
of it: a peft config to wrap a model with (`lora_config`), or a peft adapter folder for engines that load adapters
from a path (`save`). No Ray, no engine; peft is imported where it is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's name for an adapter folder's weights


@dataclass(frozen=True)
class AdapterWeights:
    """A peft LoRA adapter: delta W = (alpha / r) B A on every `target_modules` linear layer of the base model."""

    tensors: dict[str, torch.Tensor]  # peft state-dict names (base_model.model.model.layers.0.mlp.up_proj.lora_A...)
    r: int
    alpha: float
    target_modules: tuple[str, ...]  # module name suffixes, e.g. ("q_proj", "v_proj")
    dropout: float = 0.0  # training only; engines serve without it

    @classmethod
    def of_peft_model(cls, model: torch.nn.Module, adapter_name: str = "default") -> AdapterWeights:
        """A peft model's adapter as CPU copies (`get_peft_model_state_dict`); LoRA variants these four fields do not
        describe (rsLoRA, DoRA, per-module ranks, biases, saved modules) are refused rather than served wrong."""
        from peft import get_peft_model_state_dict

        config = model.peft_config[adapter_name]
        if (config.use_rslora or config.use_dora or config.rank_pattern or config.alpha_pattern
                or config.bias != "none" or config.modules_to_save):
            raise ValueError("AdapterWeights carries plain LoRA (r, alpha, target_modules, dropout); this adapter uses "
                             "rsLoRA, DoRA, per-module ranks, biases or saved modules")
        tensors = get_peft_model_state_dict(model, adapter_name=adapter_name)
        return cls({name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()},
                   r=config.r, alpha=config.lora_alpha, target_modules=tuple(sorted(config.target_modules)),
                   dropout=config.lora_dropout)

    @property
    def nbytes(self) -> int:
        """What the adapter costs to send: the bytes of its tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def lora_config(self, *, inference: bool = True) -> LoraConfig:
        """The peft config that builds this adapter's layers (inference: no dropout, no gradients)."""
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, target_modules=list(self.target_modules),
                          lora_dropout=self.dropout, inference_mode=inference)

    def save(self, folder: str | Path) -> Path:
        """Write the adapter as a peft adapter folder (what `PeftModel.from_pretrained` and vLLM's LoRA loader read)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True)
        save_file(self.tensors, str(folder / ADAPTER_WEIGHTS))
        self.lora_config().save_pretrained(str(folder))  # adapter_config.json
        return folder
