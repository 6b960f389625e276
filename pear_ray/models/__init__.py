"""Model folders: a local path, a Hugging Face Hub id resolved to its snapshot in the Hub cache (pear_ray.hub), or
a tiny Qwen2 built on the spot (no downloads), used by tests, the demo and benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pear_ray.hub import hub_snapshot
from pear_ray.models.tiny import TinyModelSpec, build_tiny_model, check_tokenizer_roundtrip, default_corpus

if TYPE_CHECKING:
    from pear_ray.config import ModelSource


def resolve_model(source: ModelSource, build_dir: Path) -> Path:
    """A model folder: the given folder (which wins when it exists), a Hub id's snapshot, or a tiny model built
    (once) under build_dir. build_dir is run_dir/models/<role>, so errors name the key `models.<role>.path`."""
    if source.path is None:
        return build_tiny_model(source.tiny, build_dir)
    folder = Path(source.path).expanduser()
    if folder.is_dir():
        return folder
    return hub_snapshot(source.path, what=f"models.{build_dir.name}.path = {source.path!r}", revision=source.revision)


__all__ = ["TinyModelSpec", "build_tiny_model", "check_tokenizer_roundtrip", "default_corpus", "resolve_model"]
