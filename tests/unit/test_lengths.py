"""Prompt + token budget against the context, before any generation: evaluation (`fit_lengths`) and
the recipe checks for rollouts and for the `eval:` section. With real engines:
tests/integration/test_eval_lengths.py."""

import json

import pytest

from reasoning.data.templates import encode, template_for
from reasoning.eval.benchmarks import load_benchmark
from reasoning.eval.evaluate import LengthNeed, check_engine_lengths, fit_lengths, length_needs
from reasoning.models.tiny import build_tiny_model
from reasoning.recipes import (
    RecipeError,
    check_eval_lengths,
    check_prompt_lengths,
    check_recipe,
    load_training_records,
    parse_recipe,
)
from reasoning.rollout.vllm_engine import check_generate_inputs


@pytest.fixture(scope="module")
def short_model(tmp_path_factory):
    """A tiny checkpoint whose context is 48 tokens (config and tokenizer)."""
    path = tmp_path_factory.mktemp("short")
    model, tokenizer = build_tiny_model("1m", path, max_positions=48)
    return str(path), model, tokenizer


def addition_needs(tokenizer, budget: int, after: int = 0) -> list[LengthNeed]:
    problems = {"addition": load_benchmark("addition", limit=20)}
    return length_needs(tokenizer, template_for(tokenizer), problems, {"addition": budget}, after)


def test_length_needs_measure_the_prompts_sampling_sends(short_model):
    _, _, tokenizer = short_model
    template = template_for(tokenizer)
    records = load_benchmark("addition", limit=20)
    longest = max(len(encode(tokenizer, template.prior_prompt(r["question"], tokenizer))) for r in records)
    (need,) = addition_needs(tokenizer, 25, after=3)
    assert (need.prompt, need.budget, need.after, need.total) == (longest, 25, 3, longest + 28)


def test_a_vllm_engine_is_sized_to_the_longest_prompt_plus_the_budget(short_model):
    path, _, tokenizer = short_model
    needs = addition_needs(tokenizer, 25)
    prompt = needs[0].prompt
    assert fit_lengths("vllm", path, tokenizer, needs, None) == {"max_model_len": prompt + 25}
    # an explicit value that holds the need is kept, with the other kwargs
    kept = fit_lengths("vllm", path, tokenizer, needs, {"max_model_len": 48, "seed": 3})
    assert kept == {"max_model_len": 48, "seed": 3}
    assert fit_lengths("hf", path, tokenizer, needs, {"device": "cpu"}) == {"device": "cpu"}
    with pytest.raises(ValueError) as error:
        fit_lengths("vllm", path, tokenizer, needs, {"max_model_len": prompt + 20})
    message = str(error.value)
    for part in (
        f"benchmark addition: its longest prompt has {prompt} tokens and the budget is 25 new tokens, "
        f"{prompt + 25} in all, more than max_model_len {prompt + 20} (--max-model-len",
        f"Raise it to at least {prompt + 25}, or leave it unset",
        "--max-tokens",
    ):
        assert part in message


def test_a_budget_beyond_the_models_context_is_an_error_naming_both_numbers(short_model):
    path, _, tokenizer = short_model
    prompt = addition_needs(tokenizer, 1)[0].prompt
    for engine in ("hf", "vllm", "vllm-server"):
        with pytest.raises(ValueError) as error:
            fit_lengths(engine, path, tokenizer, addition_needs(tokenizer, 64), None)  # addition's own budget
        assert (
            f"its longest prompt has {prompt} tokens and the budget is 64 new tokens, {prompt + 64} in all, "
            "more than the model's context of 48 tokens (the model's max_position_embeddings); lower the "
            f"budget (--max-tokens, eval.max_tokens) to at most {48 - prompt}, or evaluate a model with a "
            "longer context"
        ) in str(error.value)
    # the answer decoded after a rationale (scaling) counts too
    with pytest.raises(ValueError, match=rf"plus 10 to decode the answer.*at most {48 - prompt - 10}"):
        fit_lengths("vllm", path, tokenizer, addition_needs(tokenizer, 30, after=10), None)
    fit_lengths("vllm", path, tokenizer, addition_needs(tokenizer, 48 - prompt), None)  # exactly fits


def test_an_opened_engines_own_limit_is_checked():
    class Servers:  # what a VLLMServerEngine reports after asking its servers
        max_model_len = 40

    check_engine_lengths(Servers(), [LengthNeed("gsm8k", 10, 30)])
    with pytest.raises(ValueError, match=r"than the engine's max_model_len of 40 tokens.*--max-model-len 41"):
        check_engine_lengths(Servers(), [LengthNeed("gsm8k", 10, 30), LengthNeed("math500", 11, 30)])
    check_engine_lengths(object(), [LengthNeed("gsm8k", 10, 10**6)])  # hf: only the model's context applies


def recipe_for(path: str, trainer: str = "grpo", source: str = "synthetic:addition?n=8", **sections) -> dict:
    raw = {
        "trainer": trainer,
        "model": {"path": path},
        "data": {"train": source},
        "rollout": {"engine": "vllm", "max_tokens": 16},
        trainer: {"num_generations": 2},
        "training": {"per_device_train_batch_size": 2, "output_dir": "unused"},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


def rollout_need(raw: dict, model, tokenizer) -> int | None:
    recipe = parse_recipe(json.loads(json.dumps(raw)))
    records = load_training_records(recipe, check_recipe(recipe))
    return check_prompt_lengths(recipe, records, model, tokenizer)


def test_rollout_need_is_the_longest_kept_prompt_plus_the_generated_tokens(short_model, tmp_path):
    path, model, tokenizer = short_model
    template = template_for(tokenizer)
    recipe = parse_recipe(recipe_for(path))
    records = load_training_records(recipe, check_recipe(recipe))
    prior = [len(encode(tokenizer, template.prior_prompt(q, tokenizer))) for q in records["question"]]
    assert rollout_need(recipe_for(path), model, tokenizer) == max(prior) + 16
    # covrl also samples from the posterior prompt (the hint makes it longer)
    posterior = [
        len(encode(tokenizer, template.posterior_prompt(q, a, tokenizer)))
        for q, a in zip(records["question"], records["answer"])
    ]
    assert max(posterior) > max(prior)
    covrl = recipe_for(path, "covrl", rollout={"max_tokens": 4})
    assert rollout_need(covrl, model, tokenizer) == max(posterior) + 4
    # variational_online (estimator acc) samples answers after each trace: answer_max_tokens more
    online = recipe_for(path, "variational_online", rollout={"max_tokens": 4})
    online["variational_online"].update(answer_max_tokens=3, answer_samples=1)
    assert rollout_need(online, model, tokenizer) == max(posterior) + 4 + 3
    online["rollout"]["max_tokens"] = 48 - max(posterior)
    with pytest.raises(
        RecipeError,
        match=rf"the longest has {max(posterior)} tokens, and a prompt plus rollout.max_tokens "
        rf"\({48 - max(posterior)}\) \+ variational_online.answer_max_tokens \(3\) must fit in 48 tokens",
    ):
        rollout_need(online, model, tokenizer)


def test_an_explicit_rollout_max_model_len_above_the_models_context_is_an_error(short_model):
    path, model, tokenizer = short_model
    raw = recipe_for(path, rollout={"engine_kwargs": {"max_model_len": 64}})
    with pytest.raises(
        RecipeError,
        match=r"rollout.engine_kwargs.max_model_len \(64\) is above the model's context of 48 tokens \(the "
        r"model's max_position_embeddings\), which vLLM refuses; set it to at most 48",
    ):
        rollout_need(raw, model, tokenizer)
    raw["rollout"]["engine_kwargs"]["max_model_len"] = 40
    assert rollout_need(raw, model, tokenizer) <= 40


def test_the_eval_section_is_checked_before_training(short_model):
    path, model, tokenizer = short_model
    prompt = addition_needs(tokenizer, 1)[0].prompt

    def check(**eval_section):
        recipe = parse_recipe(recipe_for(path, eval={"benchmarks": ["addition"], **eval_section}))
        check_recipe(recipe)  # eval.max_tokens and the engine kwargs: before a model is built
        return check_eval_lengths(recipe, model, tokenizer)

    with pytest.raises(RecipeError, match=r"section 'eval': benchmark addition: .*budget is 64 .*context of 48"):
        check()  # addition's own budget, 64 tokens, cannot fit
    assert check(max_tokens=20) == prompt + 20
    with pytest.raises(RecipeError, match=r"more than max_model_len 30 \(--max-model-len, eval.engine_kwargs"):
        check(max_tokens=20, engine="vllm", engine_kwargs={"max_model_len": 30})
    with pytest.raises(RecipeError, match="max_model_len sizes a vllm engine; eval.engine is 'hf'"):
        check(max_tokens=20, engine_kwargs={"max_model_len": 40})
    with pytest.raises(RecipeError, match="eval.max_tokens must be at least 1"):
        check(max_tokens=0)
    assert check_eval_lengths(parse_recipe(recipe_for(path)), model, tokenizer) is None  # no benchmarks


def test_generate_inputs_are_checked_before_any_generation():
    """The vLLM engine's and the servers' shared check: a prompt must leave one token of max_model_len."""
    check_generate_inputs([[1] * 9, [2]], [1, 2], 10, "the engine's max_model_len", "raise it")  # fits
    with pytest.raises(ValueError, match=r"prompt 1 has 10 tokens; the servers' max_model_len is 10: restart"):
        check_generate_inputs([[1], [1] * 10], None, 10, "the servers' max_model_len", "restart them")
    with pytest.raises(ValueError, match="1 seeds for 2 prompts: give one seed per prompt"):
        check_generate_inputs([[1], [2]], [7], 10, "the engine's max_model_len", "raise it")
