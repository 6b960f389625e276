"""Model folders: a local path, a Hugging Face Hub id resolved to its snapshot in the Hub cache (pear_ray.hub), or
a tiny Qwen2 built on the spot (no downloads), used by tests, the demo and benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pear_ray.hub import hub_snapshot
from pear_ray.models.tiny import TinyModelSpec, build_tiny_model, check_tokenizer_roundtrip, default_corpus

if TYPE_CHECKING:
    from pear_ray.config import ModelSource


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # one is needed: a tokenizer_config alone
# loads as an empty tokenizer


class IncompleteModel(ValueError):
    """A model folder that lacks what loading it needs; names the folder and what is missing."""


def check_model_files(folder: Path, where: str) -> Path:
    """A Hugging Face model folder with a config, tokenizer files and readable weights (each safetensors file as
    long as its header says), or an IncompleteModel opening with `where`: one line instead of a loader's stack dump
    (transformers, vLLM), and before anything is started on it."""
    from safetensors import safe_open

    if not folder.is_dir():
        raise IncompleteModel(f"{where}: the folder does not exist")
    if not (folder / "config.json").is_file():
        raise IncompleteModel(f"{where}: no config.json, so not a Hugging Face model folder")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise IncompleteModel(f"{where}: no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); copy the "
                              "tokenizer's files in with the model's")
    shards = sorted(folder.glob("*.safetensors"))
    if not shards and not any(folder.glob("*.bin")):
        raise IncompleteModel(f"{where}: no weights (model.safetensors, its shards, or pytorch_model.bin)")
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt"):
                pass
        except Exception as error:  # noqa: BLE001 - safetensors' own error names what is wrong with the file
            raise IncompleteModel(f"{where}: {shard.name} is not a readable safetensors file ({error})") from None
    return folder


def resolve_model(source: ModelSource, build_dir: Path) -> Path:
    """A model folder: the given folder (which wins when it exists), a Hub id's snapshot, or a tiny model built
    (once) under build_dir. build_dir is run_dir/models/<role>, so errors name the key `models.<role>.path`."""
    if source.path is None:
        return build_tiny_model(source.tiny, build_dir)
    folder = Path(source.path).expanduser()
    if folder.is_dir():
        return folder
    return hub_snapshot(source.path, what=f"models.{build_dir.name}.path = {source.path!r}", revision=source.revision)


__all__ = ["TOKENIZER_FILES", "IncompleteModel", "TinyModelSpec", "check_model_files", "build_tiny_model", "check_tokenizer_roundtrip", "default_corpus", "resolve_model"]
