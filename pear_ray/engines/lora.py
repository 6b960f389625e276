"""LoRA on the learner: the student wrapped by peft, and its weights handed out merged under the model's own names.

The learner trains only the adapters (B @ A beside each target module's frozen weight W); everything that reads its
weights (the rollout engines, the weight sync, eval, the exported Hugging Face folder) sees the plain model with
W + scaling * B @ A, computed here from the live parameters without touching them. No Ray here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pear_ray.config import LoraConfig

ADAPTER = "default"  # peft's name of the one adapter
_PREFIX = "base_model.model."  # what PeftModel puts before the wrapped model's names
_BASE_LAYER = ".base_layer"  # where a LoRA layer keeps the module it wraps
_LORA_A, _LORA_B = f".lora_A.{ADAPTER}.weight", f".lora_B.{ADAPTER}.weight"


def with_adapters(model: torch.nn.Module, lora: LoraConfig) -> torch.nn.Module:
    """The model with fresh adapters (A random from torch's RNG, B zero, so it starts as the model itself); only
    the adapters require grad."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def dropout_layers(model: torch.nn.Module) -> list[torch.nn.Dropout]:
    """The adapters' dropout layers (none when the dropout is 0: peft then puts an identity there)."""
    return [layer for name, layer in model.named_modules()
            if name.endswith(f"lora_dropout.{ADAPTER}") and isinstance(layer, torch.nn.Dropout)]


@contextmanager
def dropout_on(layers: list[torch.nn.Dropout]) -> Iterator[None]:
    """`layers` in training mode for a training forward, back in eval mode after it: the learner keeps the model in
    eval mode, so log-prob passes see the model itself."""
    for layer in layers:
        layer.train()
    try:
        yield
    finally:
        for layer in layers:
            layer.eval()


def hf_name(peft_name: str) -> str:
    """The wrapped model's name of a PeftModel parameter or buffer."""
    return peft_name.removeprefix(_PREFIX).replace(_BASE_LAYER, "")


@torch.no_grad()
def merged(named: Iterable[tuple[str, torch.Tensor]], scaling: float) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of the plain model from a PeftModel's (name, tensor) pairs: each adapted weight as a new
    tensor W + (B @ A) * scaling (peft's merge, in the same order of operations), the rest as they are."""
    tensors = dict(named)
    for name, tensor in tensors.items():
        if name.endswith((_LORA_A, _LORA_B)):
            continue
        layer = name.removesuffix(f"{_BASE_LAYER}.weight")
        if layer != name and f"{layer}{_LORA_A}" in tensors:
            delta = tensors[f"{layer}{_LORA_B}"] @ tensors[f"{layer}{_LORA_A}"]
            yield hf_name(name), tensor + delta * scaling
        else:
            yield hf_name(name), tensor


def adaptable_modules(config) -> list[str]:
    """Names of the modules of a causal LM with this Hugging Face config that peft can give an adapter (linear,
    embedding, convolution), from the model built on the meta device: no weights, no memory."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, Conv1D)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [name for name, module in model.named_modules() if isinstance(module, kinds)]


def missing_targets(module_names: Iterable[str], target_modules: Iterable[str]) -> list[str]:
    """The target modules that match no module of the model, by peft's rule for a list: a module's full name
    equals the target or ends with '.' + target."""
    names = list(module_names)
    return [target for target in target_modules
            if not any(name == target or name.endswith(f".{target}") for name in names)]
