"""A reward model's folder: the one the job names (resolved like any model), or a tiny one built on the spot; and
whether a folder's config and weights are what its kind loads (a classifier with its head, a causal LM judge)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from pear_ray.models import TinyModelSpec, build_tiny_model, resolve_model

if TYPE_CHECKING:
    from pear_ray.config.rewards import RewardModelConfig

CLASSIFIER_SPEC_FILE = "pear_ray_classifier_spec.json"
HEAD_PREFIXES = ("score.", "classifier.", "classification_head.")  # transformers' names for a classification head
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "pear_ray_spec.json")


def resolve_reward_model(config: RewardModelConfig, build_dir: Path) -> Path:
    """The reward model's folder: given, a Hub snapshot, or a tiny one built (once) under build_dir; a tiny
    classifier gets a classification head (build_tiny_classifier)."""
    if config.tiny is not None and config.kind == "classifier":
        return build_tiny_classifier(config.tiny, build_dir)
    return resolve_model(config.model, build_dir)


def build_tiny_classifier(spec: TinyModelSpec, out_dir: str | Path) -> Path:
    """A seeded Qwen2ForSequenceClassification with one label and the tiny model's tokenizer, saved in `out_dir`
    (rebuilt only when the spec changes)."""
    import torch
    from transformers import AutoConfig, Qwen2ForSequenceClassification

    out = Path(out_dir)
    marker = out / CLASSIFIER_SPEC_FILE
    if marker.is_file() and json.loads(marker.read_text()) == spec.model_dump():
        return out
    with tempfile.TemporaryDirectory(prefix="pear-ray-tiny-classifier-") as scratch:
        base = build_tiny_model(spec, scratch)
        out.mkdir(parents=True, exist_ok=True)
        for path in base.iterdir():  # the tokenizer's files
            if path.name not in MODEL_FILES:
                shutil.copy2(path, out / path.name)
        config = AutoConfig.from_pretrained(base, num_labels=1, architectures=["Qwen2ForSequenceClassification"])
        torch.manual_seed(spec.seed)
        Qwen2ForSequenceClassification(config).to(torch.float32).save_pretrained(str(out))
    marker.write_text(json.dumps(spec.model_dump(), sort_keys=True) + "\n")
    return out


def folder_kind_problem(folder: Path, kind: str) -> str | None:
    """What makes a complete Hugging Face folder unfit for its reward kind (None: fit). classifier: an
    *ForSequenceClassification with one label whose weights hold the head; judge: a causal LM."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = json.loads((folder / "config.json").read_text())
    architectures = config.get("architectures") or []
    if kind == "judge":
        if not set(architectures) & set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
            return f"a judge generates its answer, so it must be a causal LM; config.json's architectures are " \
                   f"{architectures}"
        return None
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        return f"not a sequence-classification model: config.json's architectures are {architectures}, none " \
               "*ForSequenceClassification"
    labels = len(config.get("id2label") or {}) or config.get("num_labels", 2)
    if labels != 1:
        return f"the classifier has {labels} labels; a reward model gives one logit (num_labels 1)"
    names = tensor_names(folder)
    if names is not None and not any(part.startswith(HEAD_PREFIXES) for name in names
                                     for part in (name, name.split(".", 1)[-1])):
        return f"config.json says {architectures[0]}, but the weights lack its classification head (no tensor named " \
               f"{', '.join(prefix + '*' for prefix in HEAD_PREFIXES)})"
    return None


def tensor_names(folder: Path) -> list[str] | None:
    """The names of the tensors in a folder's safetensors files (read from their headers); None when it has none."""
    from safetensors import safe_open

    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        return None
    names = []
    for shard in shards:
        with safe_open(str(shard), framework="pt") as weights:
            names.extend(weights.keys())
    return names
