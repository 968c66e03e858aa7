"""Checks of a rollout trainer's settings, each in one place for its two callers: the trainer's
constructor (scripts that build trainers themselves) and the recipe checks
(`reasoning.recipes.checks.check_recipe`, before any model is loaded).

`section` is the trainer's recipe section when the caller is a recipe: messages then name recipe keys
(`grpo.num_generations`, `training.per_device_train_batch_size`, `reward.weights`); without it they
name the constructor's arguments. The sampling warpers a trainer can score are checked by the
trainer class itself (`RolloutTrainer.check_sampling`), since each trainer knows what it scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def check_generation_sizes(
    config: Any, batch_size: int, accumulation: int, section: str | None = None
) -> tuple[int, int]:
    """The batch arithmetic of one generation; returns (steps_per_generation, prompts_per_generation).

    `config` is a `RolloutTrainerConfig` (num_generations, steps_per_generation, num_iterations);
    `batch_size` and `accumulation` are per_device_train_batch_size and gradient_accumulation_steps.
    One generation makes batch_size × steps_per_generation completions (steps_per_generation defaults
    to gradient_accumulation_steps), which must be a multiple of num_generations (the group size), with
    steps_per_generation a multiple of gradient_accumulation_steps. A ValueError names the keys to
    change and values that would fit.
    """
    method, training = (f"{section}.", "training.") if section else ("", "")
    group, steps = config.num_generations, config.steps_per_generation
    for key, value in (
        ("num_generations", group),
        ("num_iterations", config.num_iterations),
        ("steps_per_generation", steps if steps is not None else 1),
    ):
        if value < 1:
            raise ValueError(f"{method}{key} must be at least 1, got {value}")
    steps = steps or accumulation
    if steps % accumulation:
        raise ValueError(
            f"{method}steps_per_generation ({steps}) must be a multiple of {training}gradient_accumulation_steps "
            f"({accumulation}); set it to {accumulation * max(1, round(steps / accumulation))} or leave it unset"
        )
    completions = batch_size * steps
    if completions % group:
        fitting_batch = next(b for b in range(batch_size, batch_size + group + 1) if (b * steps) % group == 0)
        fitting_group = max(g for g in range(1, group + 1) if completions % g == 0)
        raise ValueError(
            f"one generation makes {training}per_device_train_batch_size × steps_per_generation = {batch_size} × "
            f"{steps} = {completions} completions, which is not divisible by {method}num_generations = "
            f"{group} (the group size); set {training}per_device_train_batch_size to {fitting_batch}, or "
            f"{method}num_generations to {fitting_group}"
        )
    return steps, completions // group


def check_reward_functions(
    names: Sequence[str],
    weights: Sequence[float] | None,
    needs_rewards: bool,
    section: str | None = None,
) -> None:
    """One weight per reward function, and at least one function when the trainer's objective needs
    rewards (`RolloutTrainer.needs_rewards`). `names` are the functions' names (recipe names, or the
    functions' own)."""
    if weights is not None and len(weights) != len(names):
        functions = f"reward.functions {list(names)}" if section else "reward functions"
        raise ValueError(
            f"{'reward.weights has ' if section else ''}{len(weights)} {'values' if section else 'reward weights'} "
            f"for {len(names)} {functions}; give one weight per function"
        )
    if needs_rewards and not names:
        trainer = f"trainer {section!r}" if section else "this trainer"
        raise ValueError(
            f"{trainer} needs at least one reward function{' in reward.functions' if section else ''}"
        )
