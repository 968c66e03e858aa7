"""Recipe checks: what can be checked before anything is trained, each check in one function.

`check_recipe` runs before a model is built or anything is written (model source, engines, benchmark
and reward names, numbers, the launch, and a rollout trainer's batch arithmetic, reward functions and
sampling warpers); `check_prompt_lengths` and `check_eval_lengths` need the tokenizer and the model's
context and run right after loading, before any work. A rollout trainer's settings are checked by
the trainer's own functions (`reasoning.trainers.checks`, `RolloutTrainer.check_sampling`), which its
constructor also calls: a recipe fails before a model loads, and a script that builds the trainer
itself fails alike. Each failure is a RecipeError naming the keys to change.
"""

from __future__ import annotations

import json
import os
import re
import typing
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants, try_to_load_from_cache
from transformers import TrainingArguments

from reasoning.data.templates import encode, template_for
from reasoning.eval.benchmarks import BENCHMARKS, BenchmarkUnavailableError, load_benchmark
from reasoning.eval.evaluate import check_model_context, length_needs, vllm_lengths
from reasoning.models.tiny import TINY_SIZES
from reasoning.recipes.schema import (
    EvalConfig,
    Recipe,
    RecipeError,
    RewardConfig,
    build_sampling,
    did_you_mean,
    training_arguments,
    training_values,
)
from reasoning.recipes.table import CONFIGURED_REWARDS, REWARD_FUNCTIONS, TRAINERS
from reasoning.rollout import ENGINE_KINDS, context_length
from reasoning.trainers.checks import check_generation_sizes, check_reward_functions

ATTENTION_KERNELS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


# A hub model id: `name` or `owner/name`; anything else (two slashes, ./, /, ~) is a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_recipe(recipe: Recipe) -> TrainingArguments:
    """Check what can be checked before a model is built or anything is written; the TrainingArguments.

    Model source (tiny size, local path exists, dtype), engines, benchmark and reward names, reward
    weights, sampling settings, and the batch arithmetic of rollout trainers: one generation makes
    per_device_train_batch_size × steps_per_generation completions, which must be a multiple of
    num_generations (the group size), with steps_per_generation a multiple of
    gradient_accumulation_steps. Each failure is a RecipeError naming the keys to change.
    """
    model = recipe.model
    if model.tiny is not None and model.tiny not in TINY_SIZES:
        raise RecipeError(
            f"model.tiny {model.tiny!r} is not a tiny model size; choose one of {', '.join(TINY_SIZES)}"
        )
    if model.path is not None and not Path(model.path).expanduser().exists():
        if not _HUB_ID.match(model.path):
            raise RecipeError(
                f"model.path {model.path!r} does not exist (and is not a hub model id such as "
                "Qwen/Qwen2.5-0.5B); train the checkpoint first or correct the path"
            )
        if constants.HF_HUB_OFFLINE and not isinstance(
            try_to_load_from_cache(model.path, "config.json"), str
        ):
            raise RecipeError(
                f"model.path {model.path!r} is not a local directory, and no hub model of that name is in the "
                "local cache while HF_HUB_OFFLINE is set; download it first or correct the path"
            )
    if not isinstance(getattr(torch, model.dtype, None), torch.dtype):
        raise RecipeError(
            f"model.dtype {model.dtype!r} is not a torch dtype; use float32, bfloat16 or float16"
        )
    if model.attn_implementation is not None and model.attn_implementation not in ATTENTION_KERNELS:
        raise RecipeError(
            f"model.attn_implementation {model.attn_implementation!r} is not an attention kernel; "
            f"use one of {', '.join(ATTENTION_KERNELS)}"
        )
    for section, engine in (("rollout", recipe.rollout.engine), ("eval", recipe.eval.engine)):
        if engine not in ENGINE_KINDS:
            raise RecipeError(
                f"{section}.engine {engine!r} is not a rollout engine{did_you_mean(engine, list(ENGINE_KINDS))}"
            )
    unknown = [name for name in recipe.eval.benchmarks if name not in BENCHMARKS]
    if unknown:
        raise RecipeError(
            f"unknown benchmark(s) {unknown} in eval.benchmarks{did_you_mean(unknown[0], list(BENCHMARKS))}"
        )
    if recipe.eval.n < 1:
        raise RecipeError(f"eval.n must be at least 1, got {recipe.eval.n}")
    _check_eval_engine(recipe.eval)
    if recipe.eval.steps is not None:
        _check_eval_steps(recipe)
    if recipe.data.limit is not None and recipe.data.limit < 1:
        raise RecipeError(f"data.limit must be at least 1 (or null for all records), got {recipe.data.limit}")
    reward_functions(recipe.reward, recipe.rollout.max_tokens)  # the names and parameters
    try:
        check_reward_functions(recipe.reward.functions, recipe.reward.weights, False, section=recipe.trainer)
    except ValueError as err:
        raise RecipeError(str(err)) from err
    check_launch(recipe)  # before TrainingArguments, which sets DeepSpeed up under a DeepSpeed launch
    args = training_arguments(recipe)
    if args.learning_rate < 0:
        raise RecipeError(f"training.learning_rate must not be negative, got {args.learning_rate}")
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(args, key) < 1:
            raise RecipeError(f"training.{key} must be at least 1, got {getattr(args, key)}")
    config, name = recipe.method, recipe.trainer
    trainer_class = TRAINERS[name].rollout_class
    if trainer_class is not None:  # the trainer's own checks, with the recipe's key names
        try:
            check_generation_sizes(
                config, args.per_device_train_batch_size, args.gradient_accumulation_steps, section=name
            )
            check_reward_functions(recipe.reward.functions, None, trainer_class.needs_rewards, section=name)
        except ValueError as err:
            raise RecipeError(str(err)) from err
        sampling = build_sampling(recipe, args.seed)
        try:
            trainer_class.check_sampling(config, sampling)
        except ValueError as err:
            raise RecipeError(f"trainer {name!r}: {err}") from err
    return args


def _check_eval_steps(recipe: Recipe) -> None:
    """`eval.steps` evaluates one policy, trained by optimizer steps, that generates text."""
    steps = recipe.eval.steps
    if steps < 1:
        raise RecipeError(
            f"eval.steps must be at least 1 (or null: evaluate only before/after training), got {steps}"
        )
    if not recipe.eval.benchmarks:
        raise RecipeError(
            "eval.steps evaluates eval.benchmarks during training, but eval.benchmarks is empty; name some "
            "(e.g. eval.benchmarks: [addition]) or remove eval.steps"
        )
    problem = TRAINERS[recipe.trainer].eval_steps_problem
    if problem is not None:
        raise RecipeError(problem)


def check_launch(recipe: Recipe, env: typing.Mapping[str, str] | None = None) -> None:
    """What the launch (the environment `accelerate launch` / torchrun set) must agree with.

    A trainer may refuse a launch (`TrainerEntry.launch_problem`: the variational pipeline runs in one
    process without DeepSpeed); a DeepSpeed launch's mixed precision must be the recipe's
    (`check_launch_precision`).
    """
    values = training_values(recipe)
    launch_problem = TRAINERS[recipe.trainer].launch_problem
    problem = launch_problem(values, env) if launch_problem is not None else None
    if problem is not None:
        raise RecipeError(f"trainer {recipe.trainer!r}: {problem}")
    check_launch_precision(values, env)


# `accelerate launch` mixed precision -> the TrainingArguments flag that must be on (fp8 trains in bf16 autocast)
_PRECISION_FLAGS = {"bf16": "bf16", "fp16": "fp16", "fp8": "bf16"}


def _deepspeed_config(value: Any) -> dict | None:
    """`training.deepspeed` as a dict (it may be a JSON file's path); None when absent or unreadable."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and Path(value).expanduser().is_file():
        try:
            loaded = json.loads(Path(value).expanduser().read_text())
        except (OSError, ValueError):
            return None  # TrainingArguments reports an unreadable config itself
        return loaded if isinstance(loaded, dict) else None
    return None


def check_launch_precision(training: dict[str, Any], env: typing.Mapping[str, str] | None = None) -> None:
    """Under DeepSpeed, the launch's mixed precision and the DeepSpeed config's must be training.bf16 / fp16.

    `accelerate launch` with a DeepSpeed config exports ACCELERATE_USE_DEEPSPEED=true and
    ACCELERATE_MIXED_PRECISION (the config's `mixed_precision`, e.g. bf16 in recipes/accelerate/zero*.yaml,
    or `--mixed_precision`). transformers then builds the DeepSpeed config with `bf16.enabled: true`
    (accelerate's `DeepSpeedPlugin.set_mixed_precision`) and, when training starts and the model is
    already loaded, `HfTrainerDeepSpeedConfig.trainer_config_finalize` refuses it against
    `TrainingArguments.bf16 = False`: "Please correct the following DeepSpeed config values that mismatch
    TrainingArguments values: - ds bf16.enabled=True vs hf bf16|bf16_full_eval=False". An explicit
    (not "auto") `bf16.enabled` / `fp16.enabled` in `training.deepspeed` is compared the same way.
    Plain DDP launches are not checked: there transformers lets training.bf16 / fp16 decide.
    """
    env = os.environ if env is None else env
    recipe_flags = {
        key: bool(training.get(key) or training.get(f"{key}_full_eval")) for key in ("bf16", "fp16")
    }
    config = _deepspeed_config(training.get("deepspeed"))
    for key in ("bf16", "fp16"):
        section = (config or {}).get(key)
        value = section.get("enabled") if isinstance(section, dict) else None
        if value is not None and value != "auto" and value != recipe_flags[key]:
            raise RecipeError(
                f"training.deepspeed sets {key}.enabled: {value} but training.{key} is {recipe_flags[key]}: "
                'transformers stops such a run when training starts ("DeepSpeed config values that mismatch '
                f'TrainingArguments values"). Set training.{key}: {str(value).lower()}, or {key}.enabled: auto '
                "in the DeepSpeed config"
            )
    deepspeed = bool(training.get("deepspeed")) or env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in (
        "true",
        "1",
        "yes",
    )
    launch = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    flag = _PRECISION_FLAGS.get(launch)
    if not deepspeed or flag is None:
        return
    recipe_precision = "bf16" if recipe_flags["bf16"] else "fp16" if recipe_flags["fp16"] else None
    if recipe_precision != flag:
        raise RecipeError(
            f"this launch runs DeepSpeed in {launch} (ACCELERATE_MIXED_PRECISION={launch}: the accelerate config's "
            f"mixed_precision, or --mixed_precision) but the recipe trains in {recipe_precision or 'fp32'} "
            f"(training.{flag}: {str(recipe_flags[flag]).lower()}); transformers' DeepSpeed config check would stop "
            f'the run once the model is loaded ("ds {flag}.enabled=True vs hf {flag}|{flag}_full_eval=False"). '
            f"Set training.{flag}: true{' and training.' + recipe_precision + ': false' if recipe_precision else ''} "
            f"in the recipe (or pass --training.{flag} true), or launch with --mixed_precision "
            f"{recipe_precision or 'no'}"
        )


def check_prompt_lengths(recipe: Recipe, records, model, tokenizer) -> int | None:
    """Rollout trainers: every kept training prompt plus what is generated after it fits the context.

    Returns the rollout engine's `max_model_len` need: the longest kept prompt + the tokens generated
    after it (None for trainers without rollouts). Generated after a prompt: rollout.max_tokens, plus
    `<trainer>.answer_max_tokens` where answers are sampled after a trace (variational_online with
    estimator acc). Prompts: the prior prompts and, for trainers with a hint (covrl,
    variational_online), the posterior prompts. The context is the model's (`context_length`:
    max_position_embeddings, or a smaller tokenizer model_max_length), or
    rollout.engine_kwargs.max_model_len when smaller (one above the model's context is an error:
    vLLM refuses it). Prompts longer than `<trainer>.max_prompt_length` are dropped by the trainer,
    so with that set it is the cap that must fit, and some prompt must remain.
    """
    config, name = recipe.method, recipe.trainer
    if TRAINERS[name].rollout_class is None:
        return None
    context, source = context_length(model.config, tokenizer)
    max_model_len = recipe.rollout.engine_kwargs.get("max_model_len")
    if isinstance(max_model_len, int):
        if context is not None and max_model_len > context:
            raise RecipeError(
                f"rollout.engine_kwargs.max_model_len ({max_model_len}) is above the model's context of "
                f"{context} tokens ({source}), which vLLM refuses; set it to at most {context}, or remove it "
                "(the default is the longest kept prompt + the tokens generated after it)"
            )
        context, source = max_model_len, "rollout.engine_kwargs.max_model_len"
    tokens, generated = recipe.rollout.max_tokens, f"rollout.max_tokens ({recipe.rollout.max_tokens})"
    if getattr(config, "estimator", None) == "acc" and getattr(config, "answer_max_tokens", None):
        # answers are sampled after prompt + trace (+ marker, within the trace's budget)
        tokens += config.answer_max_tokens
        generated += f" + {name}.answer_max_tokens ({config.answer_max_tokens})"
    template = template_for(tokenizer)
    lengths = [len(encode(tokenizer, template.prior_prompt(q, tokenizer))) for q in records["question"]]
    hint = getattr(config, "hint_column", None)
    if hint is not None and hint in records.column_names:  # the engine also samples from posterior prompts
        texts = [
            template.posterior_prompt(q, str(h), tokenizer, hint_after=config.hint_after)
            for q, h in zip(records["question"], records[hint])
        ]
        lengths = [max(prior, len(encode(tokenizer, text))) for prior, text in zip(lengths, texts)]
    if context is None:
        return max(lengths) + tokens
    budget = context - tokens
    if budget < 1:
        raise RecipeError(
            f"{generated} leaves no room for a prompt in a context of {context} tokens "
            f"({source}); lower rollout.max_tokens"
        )
    cap = config.max_prompt_length
    if cap is not None:
        if cap > budget:
            raise RecipeError(
                f"{name}.max_prompt_length ({cap}) + {generated} exceeds the context of "
                f"{context} tokens ({source}); set {name}.max_prompt_length to at most {budget}"
            )
        if min(lengths) > cap:
            raise RecipeError(
                f"every training prompt is longer than {name}.max_prompt_length ({cap} tokens; the shortest has "
                f"{min(lengths)}), so none would be kept; raise it (at most {budget}) or use other data"
            )
        return max(length for length in lengths if length <= cap) + tokens
    too_long = sum(length > budget for length in lengths)
    if too_long:
        raise RecipeError(
            f"{too_long} of {len(lengths)} training prompts do not fit: the longest has {max(lengths)} tokens, "
            f"and a prompt plus {generated} must fit in {context} tokens ({source}); set "
            f"{name}.max_prompt_length: {budget} to drop the longer prompts, or lower rollout.max_tokens"
        )
    return max(lengths) + tokens


def _check_eval_engine(config: EvalConfig) -> None:
    """eval.max_tokens is a budget; eval.engine_kwargs.max_model_len belongs to a vllm engine."""
    if config.max_tokens is not None and config.max_tokens < 1:
        raise RecipeError(
            f"eval.max_tokens must be at least 1 (null: each benchmark's own budget), got {config.max_tokens}"
        )
    if "max_model_len" in config.engine_kwargs and config.engine != "vllm":
        raise RecipeError(
            f"eval.engine_kwargs.max_model_len sizes a vllm engine; eval.engine is {config.engine!r} "
            "(vllm-server: start the servers with --max-model-len; hf: the model's own context applies)"
        )


def check_eval_lengths(recipe: Recipe, model, tokenizer) -> int | None:
    """The `eval:` section's benchmarks fit: each one's longest prompt + budget (eval.max_tokens or its
    own) within the model's context, and within eval.engine_kwargs.max_model_len when given (vllm).
    Checked before training, so that a budget the model cannot hold fails now, not after training.
    Returns the largest prompt + budget (None without benchmarks)."""
    config = recipe.eval
    if not config.benchmarks:
        return None
    try:
        problems = {name: load_benchmark(name, limit=config.limit) for name in config.benchmarks}
    except BenchmarkUnavailableError as err:
        raise RecipeError(f"eval.benchmarks: {err}") from err
    budgets = {name: config.max_tokens or BENCHMARKS[name].max_tokens for name in config.benchmarks}
    needs = length_needs(tokenizer, template_for(tokenizer), problems, budgets)
    try:
        check_model_context(needs, *context_length(model.config, tokenizer))
        if config.engine == "vllm":
            vllm_lengths(needs, config.engine_kwargs)
    except ValueError as err:
        raise RecipeError(f"section 'eval': {err}") from err
    return max(need.total for need in needs)


def check_rollout_length_for_evaluation(recipe: Recipe, rollout_len: int, eval_len: int) -> int:
    """`eval.steps` evaluates with the rollout engine, so a vLLM engine must also hold the benchmarks'
    prompt + budget: the larger need, checked against an explicit rollout max_model_len."""
    if recipe.rollout.engine != "vllm":
        return rollout_len
    explicit = recipe.rollout.engine_kwargs.get("max_model_len")
    if isinstance(explicit, int) and explicit < eval_len:
        raise RecipeError(
            f"eval.steps evaluates eval.benchmarks with the rollout engine, whose max_model_len "
            f"(rollout.engine_kwargs.max_model_len: {explicit}) cannot hold a benchmark prompt + its budget "
            f"({eval_len} tokens); raise it to {eval_len}, remove it (then it is sized for both), or lower "
            "eval.max_tokens"
        )
    return max(rollout_len, eval_len)


def reward_functions(config: RewardConfig, max_tokens: int) -> list:
    """The recipe's reward functions, by name (`REWARD_FUNCTIONS`; `CONFIGURED_REWARDS` are built from
    the section's parameters and `max_tokens`, rollout.max_tokens)."""
    known = sorted([*REWARD_FUNCTIONS, *CONFIGURED_REWARDS])
    unknown = [name for name in config.functions if name not in known]
    if unknown:
        raise RecipeError(f"unknown reward function(s) {unknown} in section 'reward'; choose from {known}")
    overlong = "soft_overlong_punishment" in config.functions
    given = [key for key in ("soft_punish_cache", "max_completion_len") if getattr(config, key) is not None]
    if given and not overlong:
        raise RecipeError(
            f"reward.{given[0]} is a parameter of soft_overlong_punishment, which reward.functions "
            f"{config.functions} does not list: add it, or remove reward.{given[0]}"
        )
    if overlong and config.soft_punish_cache is None:
        raise RecipeError(
            "soft_overlong_punishment needs reward.soft_punish_cache (L_cache, e.g. a fifth of "
            f"rollout.max_tokens = {max_tokens // 5}, DAPO's 4096 of 20480)"
        )
    try:
        return [
            CONFIGURED_REWARDS[name](config, max_tokens) if name in CONFIGURED_REWARDS else REWARD_FUNCTIONS[name]
            for name in config.functions
        ]
    except ValueError as err:
        raise RecipeError(f"section 'reward': {err}") from err
