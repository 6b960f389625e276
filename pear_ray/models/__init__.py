"""Locally built models (no downloads): the tiny Qwen2 factory used by tests, the demo and benchmarks."""

from pear_ray.models.tiny import TinyModelSpec, build_tiny_model, check_tokenizer_roundtrip, default_corpus

__all__ = ["TinyModelSpec", "build_tiny_model", "check_tokenizer_roundtrip", "default_corpus"]
