"""Model folders: a given path, or a tiny Qwen2 built on the spot (no downloads), used by tests, the demo and
benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pear_ray.models.tiny import TinyModelSpec, build_tiny_model, check_tokenizer_roundtrip, default_corpus

if TYPE_CHECKING:
    from pear_ray.config import ModelSource


def resolve_model(source: ModelSource, build_dir: Path) -> Path:
    """A model folder: the given path, or a tiny model built (once) under build_dir."""
    if source.path is not None:
        if not Path(source.path).is_dir():
            raise FileNotFoundError(f"model folder {source.path} does not exist")
        return Path(source.path)
    return build_tiny_model(source.tiny, build_dir)


__all__ = ["TinyModelSpec", "build_tiny_model", "check_tokenizer_roundtrip", "default_corpus", "resolve_model"]
