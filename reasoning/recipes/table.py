"""What a recipe can name: the trainers (`TRAINERS`) and the reward functions (`REWARD_FUNCTIONS`).

`TRAINERS` is one plain dict, trainer name -> `TrainerEntry`: the dataclass of the recipe section
named like the trainer (defined next to the trainer) and the builder that makes, from the loaded
model, data and TrainingArguments (`BuildParts`), what `reasoning.recipes.build.run` trains. The few
other things a run must know about a trainer are columns of the same row: the class of a rollout
trainer (whose settings `reasoning.recipes.checks.check_recipe` checks before any model is loaded),
whether the builder makes a pipeline of stages rather than one `transformers.Trainer`, and why
`eval.steps` or a launch cannot apply. The schema, the checks and the run code name no trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainingArguments

from reasoning.rewards.code import code_reward
from reasoning.rewards.format import boxed_format_reward, tagged_answer_format_reward
from reasoning.rewards.length import SoftOverlongPunishment
from reasoning.rewards.verifier import correctness, reference_steps
from reasoning.rollout import RolloutEngine, Sampling
from reasoning.trainers.base import RolloutTrainer
from reasoning.trainers.bayes import BayesConfig, BayesTrainer
from reasoning.trainers.covrl import CoVRLConfig, CoVRLTrainer
from reasoning.trainers.gflownet import GFlowNetConfig, GFlowNetTrainer
from reasoning.trainers.grpo import GRPOConfig, GRPOTrainer
from reasoning.trainers.latent_thought import DualRateConfig, make_latent_thought_trainer
from reasoning.trainers.sft import SFTConfig, make_sft_trainer
from reasoning.trainers.variational import (
    VariationalConfig,
    VariationalReasoningPipeline,
    single_process_problem,
)
from reasoning.trainers.variational_online import OnlineVariationalConfig, OnlineVariationalTrainer

if TYPE_CHECKING:  # the schema imports this table; a type only
    from reasoning.recipes.schema import Recipe

# The reward functions a recipe names in `reward.functions` (TRL reward-function signature).
REWARD_FUNCTIONS: dict[str, Callable[..., list[float | None]]] = {
    "correctness": correctness,
    "reference_steps": reference_steps,
    "boxed_format": boxed_format_reward,
    "answer_format": tagged_answer_format_reward(),
    "code": code_reward,  # sandboxed execution against the dataset's `tests` column
}

# Reward functions with parameters: name -> maker(the `reward:` section, rollout.max_tokens).
CONFIGURED_REWARDS: dict[str, Callable[[Any, int], Callable[..., list[float | None]]]] = {
    "soft_overlong_punishment": lambda reward, max_tokens: SoftOverlongPunishment(
        reward.max_completion_len or max_tokens, reward.soft_punish_cache
    ),
}


@dataclass
class BuildParts:
    """What a builder gets from the run: the recipe, what was loaded for it, and an engine maker."""

    recipe: Recipe
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    records: Dataset
    args: TrainingArguments
    training: dict[str, Any]  # the `training:` section with the toolkit's defaults (`training_values`)
    callbacks: list
    model_path: str  # the starting checkpoint (engines that load weights start from it)
    reward_funcs: list[Callable[..., list[float | None]]]
    sampling: Sampling | None  # the `rollout:` section's, for rollout trainers
    # engine(model, tokenizer, model_path, max_model_len=None) -> the recipe's rollout engine
    engine: Callable[..., RolloutEngine]
    max_model_len: int | None = None  # what the rollouts need (`check_prompt_lengths`)
    console: Any = None


class TrainerEntry(NamedTuple):
    """One row of `TRAINERS`."""

    config: type  # the dataclass of the recipe section named like the trainer
    build: Callable[[BuildParts], Any]  # a transformers.Trainer (or, with `pipeline`, an object with run())
    rollout_class: type[RolloutTrainer] | None = None  # a rollout trainer: its settings are checked early
    pipeline: bool = False  # build makes a pipeline of stages whose run() trains and saves `final/` itself
    eval_steps_problem: str | None = None  # why `eval.steps` cannot apply to this trainer
    # (training values, environment) -> why this launch cannot run the trainer, or None
    launch_problem: Callable[[Mapping[str, Any], Mapping[str, str] | None], str | None] | None = None


def build_sft(parts: BuildParts) -> Any:
    return make_sft_trainer(
        parts.model,
        parts.tokenizer,
        parts.records,
        parts.args,
        parts.recipe.method,
        callbacks=parts.callbacks,
    )


def build_latent_thought(parts: BuildParts) -> Any:
    return make_latent_thought_trainer(
        parts.model, parts.tokenizer, parts.records, parts.args, parts.recipe.method, parts.callbacks
    )


def build_variational(parts: BuildParts) -> VariationalReasoningPipeline:
    recipe = parts.recipe

    def engine_for(path: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> RolloutEngine:
        return parts.engine(model, tokenizer, path)

    return VariationalReasoningPipeline(
        recipe.method,
        parts.model_path,
        parts.records,
        parts.training,
        engine_for,
        trace_max_tokens=recipe.rollout.max_tokens,
        console=parts.console,
        dtype=recipe.model.dtype,
        lora=recipe.model.lora,
    )


def build_rollout_trainer(trainer_class: type[RolloutTrainer], parts: BuildParts) -> RolloutTrainer:
    """A rollout trainer on the recipe's engine, sampling settings and reward functions."""
    return trainer_class(
        model=parts.model,
        args=parts.args,
        config=parts.recipe.method,
        train_dataset=parts.records,
        processing_class=parts.tokenizer,
        reward_funcs=parts.reward_funcs,
        reward_weights=parts.recipe.reward.weights,
        engine=parts.engine(parts.model, parts.tokenizer, parts.model_path, parts.max_model_len),
        sampling=parts.sampling,
        callbacks=parts.callbacks,
    )


def rollout_entry(trainer_class: type[RolloutTrainer], config: type) -> TrainerEntry:
    def build(parts: BuildParts) -> RolloutTrainer:
        return build_rollout_trainer(trainer_class, parts)

    return TrainerEntry(config, build, rollout_class=trainer_class)


TRAINERS: dict[str, TrainerEntry] = {
    "sft": TrainerEntry(SFTConfig, build_sft),
    "grpo": rollout_entry(GRPOTrainer, GRPOConfig),
    "variational": TrainerEntry(
        VariationalConfig,
        build_variational,
        pipeline=True,
        eval_steps_problem=(
            "eval.steps needs a trainer that trains one policy step by step; trainer 'variational' is a "
            "pipeline of stages (prior, posterior and final SFT, each its own model). Remove eval.steps: the "
            "final model is evaluated on eval.benchmarks after training"
        ),
        launch_problem=single_process_problem,
    ),
    "variational_online": rollout_entry(OnlineVariationalTrainer, OnlineVariationalConfig),
    "gflownet": rollout_entry(GFlowNetTrainer, GFlowNetConfig),
    "latent_thought": TrainerEntry(
        DualRateConfig,
        build_latent_thought,
        eval_steps_problem=(
            "eval.steps evaluates a policy that answers by generation alone; a latent thought model answers "
            "through posterior inference over its latent vectors. Remove eval.steps and use "
            "latent_thought.heldout (ELBO perplexity bound and few-shot accuracy after training)"
        ),
    ),
    "covrl": rollout_entry(CoVRLTrainer, CoVRLConfig),
    "bayes": rollout_entry(BayesTrainer, BayesConfig),
}
