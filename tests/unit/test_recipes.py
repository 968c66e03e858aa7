"""Recipe validation: unknown keys name the key, the section and the closest valid key."""

from pathlib import Path

import pytest
import yaml

from reasoning.recipes import RecipeError, apply_overrides, load_recipe, parse_recipe, training_arguments

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def base() -> dict:
    return {
        "trainer": "sft",
        "model": {"tiny": "1m"},
        "data": {"train": "synthetic:addition?n=10"},
        "training": {"output_dir": "x", "max_steps": 3},
    }


def test_every_shipped_recipe_parses():
    demo = sorted((RECIPES / "demo").glob("*.yaml"))
    papers = sorted((RECIPES / "papers").glob("*.yaml"))
    assert demo and papers
    for path in demo + papers:
        recipe = load_recipe(path)
        assert recipe.trainer
        if path in demo:  # paper recipes ask for bf16 on GPUs
            training_arguments(recipe)


def test_unknown_key_names_section_and_closest_key():
    raw = base()
    raw["training"]["learnig_rate"] = 1e-3
    with pytest.raises(RecipeError, match=r"'learnig_rate' in section 'training'.*'learning_rate'"):
        parse_recipe(raw)
    raw = base()
    raw["model"]["tinyy"] = "1m"
    with pytest.raises(RecipeError, match=r"'tinyy' in section 'model'.*'tiny'"):
        parse_recipe(raw)
    raw = base()
    raw["sft"] = {"max_lenght": 3}
    with pytest.raises(RecipeError, match=r"'max_lenght' in section 'sft'.*'max_length'"):
        parse_recipe(raw)


def test_unknown_section_and_trainer():
    raw = base()
    raw["rolout"] = {}
    with pytest.raises(RecipeError, match=r"unknown section 'rolout'.*'rollout'"):
        parse_recipe(raw)
    raw = base()
    raw["trainer"] = "nope"
    with pytest.raises(RecipeError, match=r"unknown trainer 'nope'; choose one of .*sft"):
        parse_recipe(raw)


def test_model_needs_path_or_tiny():
    raw = base()
    raw["model"] = {}
    with pytest.raises(RecipeError, match="'path'.*'tiny'"):
        parse_recipe(raw)


def test_dotted_overrides_parse_yaml_values():
    raw = apply_overrides(base(), ["--training.max_steps", "7", "--sft.dr_sft=true", "--model.tiny", "3m"])
    recipe = parse_recipe(raw)
    assert recipe.training["max_steps"] == 7
    assert recipe.method.dr_sft is True
    assert recipe.model.tiny == "3m"
    with pytest.raises(RecipeError, match="--section.key"):
        apply_overrides(base(), ["training.max_steps", "7"])
    with pytest.raises(RecipeError, match="no value"):
        apply_overrides(base(), ["--training.max_steps"])


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [sft\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(base()))
    assert load_recipe(good).data.train == "synthetic:addition?n=10"


def test_exponent_floats_are_numbers(tmp_path):
    raw = base()
    raw["training"]["learning_rate"] = "1e-5"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    recipe = load_recipe(path, ["--training.weight_decay", "2e-3"])
    assert recipe.training["learning_rate"] == 1e-5 and recipe.training["weight_decay"] == 2e-3


def test_attention_kernel_is_checked_and_applied(tmp_path):
    from reasoning.recipes import check_recipe, load_model_and_tokenizer

    raw = base()
    raw["model"]["attn_implementation"] = "eagre"
    with pytest.raises(RecipeError, match=r"model.attn_implementation 'eagre'.*eager, sdpa"):
        check_recipe(parse_recipe(raw))
    raw["model"]["attn_implementation"] = "eager"
    recipe = parse_recipe(raw)
    check_recipe(recipe)
    model, _, _ = load_model_and_tokenizer(recipe.model, tmp_path)
    assert model.config._attn_implementation == "eager"
    raw["model"].pop("attn_implementation")
    model, _, _ = load_model_and_tokenizer(parse_recipe(raw).model, tmp_path)
    assert model.config._attn_implementation == "sdpa"  # transformers' default is left alone
