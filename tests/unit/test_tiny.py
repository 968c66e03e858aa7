"""The tiny model and tokenizer build locally and reload through the Auto classes."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from reasoning.models.tiny import TINY_SIZES, build_char_tokenizer, build_tiny_model, count_parameters


def test_tokenizer_is_one_token_per_character_and_round_trips():
    tokenizer = build_char_tokenizer()
    text = "Q:347+285\nT:7+5=12, 4+8+1=13\nA:632 ~{}\\"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 1
    assert tokenizer.decode([*ids, tokenizer.eos_token_id], skip_special_tokens=True) == text


def test_tokenizer_handles_any_unicode_as_bytes():
    tokenizer = build_char_tokenizer()
    text = "x² ≤ π — ok"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode())
    assert tokenizer.decode(ids) == text


def test_sizes_span_one_to_twenty_five_million_parameters_with_head_dim_at_least_32():
    counts = {}
    for name, shape in TINY_SIZES.items():
        assert shape.hidden_size // shape.num_heads >= 32, name
        model, _ = build_tiny_model(name)
        counts[name] = count_parameters(model)
    assert 0.8e6 <= counts["1m"] <= 1.5e6
    assert 4.5e6 <= counts["6m"] <= 8e6
    assert 20e6 <= counts["25m"] <= 30e6
    assert list(counts.values()) == sorted(counts.values())


def test_saved_model_reloads_with_auto_classes_and_same_outputs(tmp_path):
    model, tokenizer = build_tiny_model("1m", tmp_path, seed=3)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    text = "Q:12+34\nT:"
    assert loaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-6)
    assert loaded.config.tie_word_embeddings
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_seed_controls_initialisation():
    a, _ = build_tiny_model("1m", seed=1)
    b, _ = build_tiny_model("1m", seed=1)
    c, _ = build_tiny_model("1m", seed=2)
    assert torch.equal(a.model.layers[0].mlp.up_proj.weight, b.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)
