"""Bad training data: empty sources, missing columns, non-string answers, prompts longer than the context."""

import json

import pytest
import yaml

from reasoning.data.datasets import DataError, load_records
from reasoning.models.tiny import build_tiny_model
from reasoning.recipes import (
    RecipeError,
    check_prompt_lengths,
    check_recipe,
    load_training_records,
    parse_recipe,
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_empty_sources_are_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="is empty"):
        load_records(str(tmp_path / "empty.jsonl"))
    source = write_jsonl(tmp_path / "one.jsonl", [{"question": "1+1", "answer": "2"}])
    with pytest.raises(DataError, match=r"has no records \(data.limit is 0\)"):
        load_records(source, limit=0)


def test_malformed_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"question": "1+1", "answer": \n')
    with pytest.raises(DataError, match="broken.jsonl' cannot be read"):
        load_records(str(tmp_path / "broken.jsonl"))


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"question": "1+1", "answer": "2"}, {"question": "2+2", "answer": None}], r"row 1 .* answer None"),
        ([{"question": "1+1", "answer": [2]}], r"row 0 .* answer \[2\] \(list\)"),
        ([{"question": "1+1", "answer": {"v": 2}}], r"row 0 .* answer \{'v': 2\} \(dict\)"),
        ([{"question": "  ", "answer": "2"}], r"row 0 .* question '  '"),
    ],
)
def test_answers_and_questions_must_be_strings_or_numbers(tmp_path, rows, message):
    with pytest.raises(DataError, match=message):
        load_records(write_jsonl(tmp_path / "d.jsonl", rows))


def test_numbers_and_booleans_become_strings(tmp_path):
    rows = [{"question": "6*7", "answer": 42}, {"question": "is 2 even?", "answer": True}]
    records = load_records(write_jsonl(tmp_path / "d.jsonl", rows))
    assert records["answer"] == ["42", "True"]


def test_missing_column_through_a_recipe(tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", [{"problem": "1+1", "answer": "2"}])
    recipe = parse_recipe({"trainer": "sft", "model": {"tiny": "1m"}, "data": {"train": source}})
    with pytest.raises(
        RecipeError, match=r"section 'data': column 'question' .* available columns: problem, answer"
    ):
        load_training_records(recipe, check_recipe(recipe))


def test_code_reward_needs_a_tests_column(tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", [{"question": "print 1", "answer": "1"}] * 4)
    raw = {
        "trainer": "grpo",
        "model": {"tiny": "1m"},
        "data": {"train": source},
        "reward": {"functions": ["code"]},
    }
    raw["grpo"], raw["training"] = (
        {"num_generations": 2},
        {"per_device_train_batch_size": 2, "output_dir": "x"},
    )
    recipe = parse_recipe(raw)
    with pytest.raises(RecipeError, match="data column 'tests', which .* does not have"):
        load_training_records(recipe, check_recipe(recipe))


def grpo_recipe(source: str, **grpo) -> dict:
    return {
        "trainer": "grpo",
        "model": {"tiny": "1m"},
        "data": {"train": source},
        "rollout": {"max_tokens": 16},
        "grpo": {"num_generations": 2, **grpo},
        "training": {"per_device_train_batch_size": 2, "output_dir": "unused"},
    }


def test_prompts_longer_than_the_context(tmp_path):
    model, tokenizer = build_tiny_model("1m", max_positions=64)
    rows = [{"question": "1+1", "answer": "2"}, {"question": "9" * 100, "answer": "9"}]
    source = write_jsonl(tmp_path / "d.jsonl", rows)

    def check(**grpo):
        recipe = parse_recipe(grpo_recipe(source, **grpo))
        records = load_training_records(recipe, check_recipe(recipe))
        check_prompt_lengths(recipe, records, model, tokenizer)

    with pytest.raises(
        RecipeError,
        match=r"1 of 2 training prompts do not fit: the longest has \d+ tokens.*rollout.max_tokens \(16\).*64 "
        r"tokens \(the model's max_position_embeddings\); set grpo.max_prompt_length: 48",
    ):
        check()
    with pytest.raises(
        RecipeError, match=r"grpo.max_prompt_length \(60\) \+ rollout.max_tokens \(16\) exceeds"
    ):
        check(max_prompt_length=60)
    with pytest.raises(RecipeError, match="every training prompt is longer than grpo.max_prompt_length"):
        check(max_prompt_length=2)
    check(max_prompt_length=48)  # the long prompt is dropped by the trainer; the short one fits
    recipe = grpo_recipe(source)
    recipe["rollout"]["engine_kwargs"] = {"max_model_len": 16}
    parsed = parse_recipe(yaml.safe_load(yaml.safe_dump(recipe)))
    with pytest.raises(RecipeError, match=r"rollout.max_tokens \(16\) leaves no room.*max_model_len"):
        check_prompt_lengths(parsed, load_training_records(parsed, check_recipe(parsed)), model, tokenizer)
