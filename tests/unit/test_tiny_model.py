"""The tiny-model factory: validation, determinism, idempotence, tokenizer round-trip, loading in transformers."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer

from pear_ray.models import TinyModelSpec, build_tiny_model, check_tokenizer_roundtrip
from pear_ray.models.tiny import SPEC_FILE


def _hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_head_dim_must_be_a_vllm_cpu_size():
    with pytest.raises(ValidationError) as err:
        TinyModelSpec(hidden_size=64, num_heads=4)  # head_dim 16
    msg = str(err.value)
    assert "hidden_size=64" in msg and "num_heads=4" in msg and "16" in msg and "32, 64, 80" in msg
    with pytest.raises(ValidationError, match="head_dim 21.3333"):
        TinyModelSpec(hidden_size=64, num_heads=3)
    assert TinyModelSpec(hidden_size=128, num_heads=2).hidden_size == 128  # head_dim 64 is fine


def test_spec_rejects_bad_kv_heads_and_unknown_fields():
    with pytest.raises(ValidationError, match="num_kv_heads"):
        TinyModelSpec(hidden_size=128, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValidationError, match="extra"):
        TinyModelSpec(hidden=64)


def test_build_is_deterministic_across_processes(tiny_model_dir, tmp_path):
    # A second build in a fresh interpreter (other Rust/Python hash seeds) must give byte-identical files.
    code = ("import sys; from pear_ray.models import TinyModelSpec, build_tiny_model; "
            "build_tiny_model(TinyModelSpec(), sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "again")], check=True, capture_output=True)
    first, second = _hashes(tiny_model_dir), _hashes(tmp_path / "again")
    assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json", SPEC_FILE} <= set(first)
    assert first == second


def test_build_is_idempotent_and_rebuilds_on_spec_change(tmp_path):
    spec = TinyModelSpec(seed=1)
    out = build_tiny_model(spec, tmp_path / "m", corpus=["a b c 1 2 3", "hello world"])
    weights = out / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert build_tiny_model(spec, out, corpus=["a b c 1 2 3", "hello world"]) == out
    assert weights.stat().st_mtime_ns == stamp  # nothing rewritten
    before = _hashes(out)["model.safetensors"]
    build_tiny_model(TinyModelSpec(seed=2), out, corpus=["a b c 1 2 3", "hello world"])
    assert _hashes(out)["model.safetensors"] != before
    assert json.loads((out / SPEC_FILE).read_text())["spec"]["seed"] == 2


def test_tokenizer_round_trips_and_catches_mismatches(tiny_model_dir):
    texts = ["What is 123 + 45? The answer is 168.",
             "How many times does the letter 'r' appear in \"strawberry\"? Answer: 3",
             "  leading spaces, tabs\tand\nnew lines\n\n", "unicode: café ÿ → ∑ 🙂", ""]
    check_tokenizer_roundtrip(tiny_model_dir, texts)
    with pytest.raises(ValueError, match="round-trip"):
        check_tokenizer_roundtrip(tiny_model_dir, ["cafe\u0301"])  # not NFC: the Qwen2 normaliser changes it


def test_loads_in_transformers(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    spec = TinyModelSpec()
    assert len(tok) == model.config.vocab_size == spec.vocab_size
    assert model.dtype == torch.float32 and not model.config.tie_word_embeddings
    assert model.config.num_attention_heads == 2 and model.config.hidden_size == 64
    assert tok.eos_token == tok.pad_token == "<|endoftext|>" and tok.eos_token_id == 0
    ids = tok("What is 2 + 3?", return_tensors="pt").input_ids
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()
    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.convert_tokens_to_ids("<|im_end|>"), 0] and gen["pad_token_id"] == 0


def test_chat_template(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    # transformers 5 returns a BatchEncoding from tokenize=True; the special tokens are single ids.
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids[0] == im_start and ids.count(im_start) == 3 and ids.count(im_end) == 2
    assert tok.decode(ids) == text
