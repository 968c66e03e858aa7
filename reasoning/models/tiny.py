"""Tiny local models and a byte-level (character-level for ASCII) tokenizer, for tests and the embedded demo.

Nothing here touches the network: `build_tiny_model("1m", path)` writes a randomly initialised
Qwen2-family causal LM and a fast character-level tokenizer with `save_pretrained`, so
transformers (`AutoModelForCausalLM.from_pretrained(path)`) and vLLM (`LLM(model=path)`) load
them like any hub checkpoint. Head dimension is at least 32 because vLLM's CPU attention
kernels reject 16.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Tokenizer,
)

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2's bytes_to_unicode)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


@dataclass(frozen=True)
class TinySize:
    """Shape of a tiny Qwen2 model; parameter counts are for the character vocabulary."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int


# Name -> shape. Every head_dim (hidden_size / num_heads) is >= 32 for vLLM's CPU kernels.
TINY_SIZES: dict[str, TinySize] = {
    "1m": TinySize(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=512),
    "3m": TinySize(hidden_size=192, num_layers=6, num_heads=6, num_kv_heads=6, intermediate_size=768),
    "6m": TinySize(hidden_size=256, num_layers=6, num_heads=8, num_kv_heads=8, intermediate_size=1024),
    "12m": TinySize(hidden_size=384, num_layers=5, num_heads=6, num_kv_heads=6, intermediate_size=1536),
    "25m": TinySize(hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=8, intermediate_size=2048),
}


def build_char_tokenizer(model_max_length: int = 1024) -> Qwen2Tokenizer:
    """A byte-level tokenizer with one token per byte (so one per ASCII character), no merges.

    Ids: 0 = <|pad|>, 1 = <|endoftext|> (EOS), then the 256 bytes. It is a Qwen2 tokenizer with
    an empty merge list, so `AutoTokenizer` (which picks `Qwen2Tokenizer` for Qwen2 configs) and
    vLLM rebuild exactly this tokenizer from the saved files.
    """
    vocab = {PAD_TOKEN: 0, EOS_TOKEN: 1}
    for symbol in _byte_symbols():
        vocab[symbol] = len(vocab)
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def tiny_config(size: str, vocab_size: int, max_positions: int = 1024) -> Qwen2Config:
    """Qwen2 configuration for a tiny model named in `TINY_SIZES`."""
    if size not in TINY_SIZES:
        raise ValueError(f"unknown tiny model size {size!r}; choose one of {sorted(TINY_SIZES)}")
    shape = TINY_SIZES[size]
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.hidden_size // shape.num_heads,
        max_position_embeddings=max_positions,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        use_sliding_window=False,
        dtype="float32",
    )


def build_tiny_model(
    size: str = "1m", path: str | Path | None = None, seed: int = 0, max_positions: int = 1024
) -> tuple[Qwen2ForCausalLM, Qwen2Tokenizer]:
    """Build a randomly initialised tiny model and its tokenizer; save both to `path` if given."""
    tokenizer = build_char_tokenizer(model_max_length=max_positions)
    config = tiny_config(size, vocab_size=len(tokenizer), max_positions=max_positions)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    torch.random.set_rng_state(generator_state)
    model.generation_config = GenerationConfig(eos_token_id=1, pad_token_id=0, do_sample=False)
    if path is not None:
        save_checkpoint(model, tokenizer, path)
    return model, tokenizer


def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path) -> None:
    """Save `model` and `tokenizer` to the folder `path` (created if missing), loadable with `from_pretrained`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())
