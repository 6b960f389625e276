"""Tiny, locally built Qwen2 models for tests, the demo and benchmarks (no model can be downloaded here).

The tokenizer is a byte-level BPE trained with `tokenizers` using exactly the pipeline transformers 5 rebuilds for
a `qwen2` model (NFC, Qwen2 split regex, ByteLevel), so what we save is what transformers and vLLM load. The model
is a seeded fp32 Qwen2 causal LM whose head size vLLM's CPU attention accepts. Same spec + corpus -> byte-identical
files.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

# vLLM CPU attention only has kernels for these head sizes.
ALLOWED_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# transformers' Qwen2Tokenizer regex: training with it keeps training-time and load-time tokenization identical.
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
BUILD_FORMAT = 1  # bump when the build procedure changes, so cached folders are rebuilt
SPEC_FILE = "pear_ray_spec.json"


class TinyModelSpec(BaseModel):
    """Shape of a tiny Qwen2 model. Defaults: ~0.1M params, head_dim 32 (the smallest vLLM CPU head size)."""

    model_config = ConfigDict(extra="forbid")
    hidden_size: int = Field(64, description="the model's width; hidden_size / num_heads must be a head size vLLM's "
                             f"CPU attention has kernels for ({', '.join(map(str, ALLOWED_HEAD_DIMS))})")
    num_layers: int = Field(2, description="transformer layers")
    num_heads: int = Field(2, description="attention heads")
    num_kv_heads: int = Field(2, description="key/value heads (grouped-query attention when fewer than num_heads); "
                              "divides num_heads")
    intermediate_size: int = Field(128, description="width of each layer's MLP")
    vocab_size: int = Field(384, description="the size the byte-level BPE is trained to, counting its 256 byte "
                            "tokens and 3 special tokens (so at least 259); the embedding has a row per token")
    max_position_embeddings: int = Field(512, description="positions: the most prompt + response tokens the model "
                                         "takes")
    tie_embeddings: bool = Field(False, description="share the input embedding with the output layer, as small "
                                 "Qwen2.5 models do; untied is the simpler default for weight sync")
    seed: int = Field(0, description="seed of the initial weights (the tokenizer does not depend on it)")

    @model_validator(mode="after")
    def _check_shapes(self) -> TinyModelSpec:
        head_dim, rem = divmod(self.hidden_size, self.num_heads)
        if rem or head_dim not in ALLOWED_HEAD_DIMS:
            raise ValueError(
                f"hidden_size={self.hidden_size} / num_heads={self.num_heads} gives head_dim "
                f"{self.hidden_size / self.num_heads:g}; vLLM CPU attention needs one of {list(ALLOWED_HEAD_DIMS)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size={self.vocab_size} must be >= 259 (256 bytes + 3 special tokens)")
        return self


def default_corpus() -> list[str]:
    """Deterministic text covering digits, arithmetic, letters, short words and punctuation (reasoning-gym style)."""
    rng = random.Random(1234)
    words = ("the answer is what how many times does letter appear in word count sum of and plus minus "
             "times divided by equals result first last number yes no apple banana cherry strawberry "
             "reasoning think step final solve calculate find value total user assistant system").split()
    lines = [" ".join(words), "0123456789", "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
             "Question: Answer: <think> </think> <answer> </answer> ( ) [ ] { } . , ; : ! ? ' \" - + * / = % #"]
    for _ in range(400):
        a, b = rng.randint(0, 999), rng.randint(0, 99)
        op, val = rng.choice([("+", a + b), ("-", a - b), ("*", a * b)])
        w = rng.choice(words)
        c = rng.choice(w)
        lines += [f"What is {a} {op} {b}? The answer is {val}.",
                  f"How many times does the letter '{c}' appear in \"{w}\"? Answer: {w.count(c)}"]
    return lines


def check_tokenizer_roundtrip(model_dir: str | Path, texts: Iterable[str]) -> None:
    """Raise unless the tokenizer transformers loads from `model_dir` round-trips every text and gives the same ids
    as the saved tokenizer.json: transformers 5 rebuilds the tokenizer from the model type (Qwen2Tokenizer for
    qwen2), which can silently tokenize differently from what was saved. Texts must be NFC (Qwen2 normalises).
    """
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    saved = Path(model_dir) / "tokenizer.json"
    raw = Tokenizer.from_file(str(saved)) if saved.is_file() else None
    for i, text in enumerate(texts):
        ids = tok.encode(text, add_special_tokens=False)
        back = tok.decode(ids)
        if back != text:
            raise ValueError(f"tokenizer in {model_dir} does not round-trip text #{i}: {text!r} -> {ids} -> {back!r}")
        if raw is not None and raw.encode(text, add_special_tokens=False).ids != ids:
            raise ValueError(f"tokenizer loaded by transformers from {model_dir} ({type(tok).__name__}) gives other "
                             f"ids than the saved tokenizer.json for text #{i}: {text!r}")


def build_tiny_model(spec: TinyModelSpec, out_dir: str | Path, corpus: Iterable[str] | None = None) -> Path:
    """Train the tokenizer, build a seeded fp32 Qwen2 model and save a Hugging Face folder in `out_dir`.

    Idempotent: a folder already built from the same spec + corpus (see pear_ray_spec.json) is returned as is.
    """
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    out, corpus = Path(out_dir), list(default_corpus() if corpus is None else corpus)
    h = hashlib.sha256(json.dumps({"format": BUILD_FORMAT, "spec": spec.model_dump()}, sort_keys=True).encode())
    for text in corpus:
        h.update(hashlib.sha256(text.encode()).digest())
    key, spec_path = h.hexdigest(), out / SPEC_FILE
    if spec_path.is_file() and json.loads(spec_path.read_text()).get("key") == key:
        return out
    out.mkdir(parents=True, exist_ok=True)
    spec_path.unlink(missing_ok=True)  # written last: its presence means a complete build

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer=trainer)
    eos, im_start, im_end = SPECIAL_TOKENS
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos, pad_token=eos, unk_token=None,
                                  additional_special_tokens=[im_start, im_end], chat_template=CHAT_TEMPLATE,
                                  model_max_length=spec.max_position_embeddings)
    tok.save_pretrained(str(out))
    eos_id, im_end_id = tok.convert_tokens_to_ids(eos), tok.convert_tokens_to_ids(im_end)

    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings, tie_word_embeddings=spec.tie_embeddings,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, dtype="float32",
    )
    torch.manual_seed(spec.seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    # Chat turns end with <|im_end|>: generation stops there or at <|endoftext|> (vLLM reads this file too).
    model.generation_config = GenerationConfig(bos_token_id=eos_id, eos_token_id=[im_end_id, eos_id],
                                               pad_token_id=eos_id)
    model.save_pretrained(str(out))  # safetensors

    check_tokenizer_roundtrip(out, corpus + ["  spaces\tand\nnew lines ", "<|im_start|>user\nhi<|im_end|>\n"])
    spec_path.write_text(json.dumps({"key": key, "spec": spec.model_dump()}, indent=2, sort_keys=True) + "\n")
    return out
