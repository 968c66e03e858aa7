"""YAML recipe -> validated configuration -> trainer run.

- `reasoning.recipes.schema`: the sections, parsing, unknown-key and type errors, dotted overrides
  (`load_recipe`, `parse_recipe`, `apply_overrides`).
- `reasoning.recipes.table`: what a recipe can name, `TRAINERS` (name -> config class and builder)
  and `REWARD_FUNCTIONS`.
- `reasoning.recipes.checks`: the checks before anything is trained (`check_recipe`,
  `check_launch`, `check_prompt_lengths`, `check_eval_lengths`).
- `reasoning.recipes.build`: loading, building, `run`, evaluation and the report.
- `reasoning.recipes.docs`: the config tables of `docs/<trainer>.md`, from the fields' help.

The names below are the public ones, importable from `reasoning.recipes` directly.
"""

from reasoning.recipes.build import (
    build_engine,
    build_trainer,
    latest_checkpoint,
    load_model_and_tokenizer,
    load_training_records,
    run,
    write_run_report,
)
from reasoning.recipes.checks import (
    ATTENTION_KERNELS,
    check_eval_lengths,
    check_launch,
    check_launch_precision,
    check_prompt_lengths,
    check_recipe,
    reward_functions,
)
from reasoning.recipes.schema import (
    SECTIONS,
    DataConfig,
    EvalConfig,
    ModelConfig,
    Recipe,
    RecipeError,
    RewardConfig,
    RolloutConfig,
    apply_overrides,
    build_sampling,
    load_recipe,
    parse_recipe,
    training_arguments,
    training_values,
)
from reasoning.recipes.table import REWARD_FUNCTIONS, TRAINERS, BuildParts, TrainerEntry

__all__ = [
    "ATTENTION_KERNELS",
    "REWARD_FUNCTIONS",
    "SECTIONS",
    "TRAINERS",
    "BuildParts",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "Recipe",
    "RecipeError",
    "RewardConfig",
    "RolloutConfig",
    "TrainerEntry",
    "apply_overrides",
    "build_engine",
    "build_sampling",
    "build_trainer",
    "check_eval_lengths",
    "check_launch",
    "check_launch_precision",
    "check_prompt_lengths",
    "check_recipe",
    "latest_checkpoint",
    "load_model_and_tokenizer",
    "load_recipe",
    "load_training_records",
    "parse_recipe",
    "reward_functions",
    "run",
    "training_arguments",
    "training_values",
    "write_run_report",
]
