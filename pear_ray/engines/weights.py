"""The learner's weights out of the engine: for the rollout service, as a Hugging Face folder, as a fingerprint.

Under ZeRO-3 each parameter is gathered on its own (one all-gather each), so every rank must iterate to the end.
"""

from __future__ import annotations

import shutil
from contextlib import nullcontext
from pathlib import Path

import torch

from pear_ray import atomic, faults
from pear_ray.engines import lora as adapters
from pear_ray.engines.adapters import AdapterWeights
from pear_ray.storage import RunFolder

# Files of a model folder that make up its tokenizer; export_hf copies them next to the weights.
TOKENIZER_PATTERNS = ("tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                      "chat_template*", "spiece.model")
ADAPTER_FOLDER = "adapter"  # under LoRA, where export_hf puts the peft adapter beside the merged model


def gathered_params(learner, to_all: bool = False):
    """Yield (HF name, full tensor) per parameter, then persistent buffers; on rank 0 only unless to_all. Under
    LoRA, those of the plain model with the adapters merged (new tensors where merged)."""
    if learner.lora is None:
        yield from _module_tensors(learner, to_all)
        return
    tensors = _module_tensors(learner, to_all)
    if learner.zero_stage == 3:  # a gathered parameter is released after its turn: the merge needs W, A, B at once
        tensors = ((name, tensor.to("cpu", copy=True)) for name, tensor in tensors)
    yield from adapters.merged(tensors, learner.lora.scaling)


def _module_tensors(learner, to_all: bool):
    """(name, full tensor) of the training module's parameters, then persistent buffers."""
    module = learner.engine.module
    emit = to_all or learner.rank == 0
    for name, param in module.named_parameters():
        with _gathered(learner, [param]):
            if emit:
                yield name, param.detach()
    if emit:  # buffers are never partitioned; only persistent ones belong in a state dict
        for name, buffer in module.named_buffers():
            owner, _, leaf = name.rpartition(".")
            if leaf not in module.get_submodule(owner)._non_persistent_buffers_set:
                yield name, buffer.detach()


def state_dict(learner) -> dict[str, torch.Tensor] | None:
    """Full weights on rank 0 as {HF name: CPU contiguous tensor} (copies, not views of the live parameters), in
    the training dtype; None on other ranks."""
    out = {name: tensor.to("cpu", copy=True).contiguous() for name, tensor in gathered_params(learner)}
    return out if learner.rank == 0 else None


def adapter(learner) -> AdapterWeights | None:
    """Under LoRA, the adapters alone on rank 0 (CPU copies): what an adapter-only sync sends; None on other
    ranks. Under ZeRO-3 every rank takes part in gathering them."""
    with _gathered(learner, _adapter_params(learner)):
        return AdapterWeights.of_peft_model(learner.engine.module) if learner.rank == 0 else None


def _adapter_params(learner) -> list[torch.nn.Parameter]:
    return [param for param in learner.engine.module.parameters() if param.requires_grad]


def _adapter_state(learner) -> dict[str, torch.Tensor] | None:
    """The adapters' parameters under the PeftModel's names, CPU copies on rank 0 (what peft's save_pretrained
    writes); None on other ranks. Collective under ZeRO-3."""
    named = [(name, param) for name, param in learner.engine.module.named_parameters() if param.requires_grad]
    with _gathered(learner, [param for _, param in named]):
        return {name: param.detach().to("cpu", copy=True) for name, param in named} if learner.rank == 0 else None


def _gathered(learner, params: list[torch.nn.Parameter]):
    """ZeRO-3: the parameters whole on every rank inside the block; otherwise they already are."""
    if learner.zero_stage != 3:
        return nullcontext()
    return learner.deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def policy_nbytes(learner) -> int:
    """Bytes a sync sends to each rollout actor: the adapters' under LoRA, else every weight's."""
    if learner.lora is not None:  # ZeRO-3 partitions them: ds_numel is the whole count
        return sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in _adapter_params(learner))
    return sum(tensor.numel() * tensor.element_size() for _, tensor in gathered_params(learner, to_all=True))


@torch.no_grad()
def checksum(learner) -> float:
    """A position-sensitive float64 fingerprint of the full parameters: sum_i p_i cos(i) per tensor, summed. Every
    rank returns it; for tests comparing ranks and runs."""
    total = 0.0
    for _, tensor in gathered_params(learner, to_all=True):
        flat = tensor.reshape(-1).double()
        total += float(flat @ torch.cos(torch.arange(flat.numel(), dtype=torch.float64, device=flat.device)))
    return total


def export_hf(learner, out_dir: str | Path) -> str | None:
    """Write a Hugging Face model folder (safetensors, config, generation config, the tokenizer files of the model
    folder the learner started from) from rank 0; under LoRA the merged model, plus the adapters alone as a peft
    folder in `adapter/`. `out_dir` a URL: into this node's copy, then uploaded, so any node finds it in the bucket.
    Returns `out_dir` on rank 0, None elsewhere."""
    weights = state_dict(learner)
    adapter_state = _adapter_state(learner) if learner.lora is not None else None
    if learner.rank != 0:
        return None
    store = RunFolder(out_dir)
    model = learner.engine.module
    with atomic.replacing(store.local) as partial:
        partial.mkdir()
        if learner.lora is not None:  # PeftModel: the adapters and their config
            model.save_pretrained(str(partial / ADAPTER_FOLDER), state_dict=adapter_state)
            model = model.get_base_model()
        model.save_pretrained(str(partial), state_dict=weights)
        for pattern in TOKENIZER_PATTERNS:
            for source in learner.model_dir.glob(pattern):
                if source.is_file():
                    shutil.copy2(source, partial / source.name)
        faults.kill_point(f"export/{store.local.name}")
    store.publish(store.local)
    return str(out_dir)
