"""Recipe schema: the sections, parsing and validation of a YAML recipe's keys and types.

A recipe is one YAML file with the sections `trainer:` (the trainer's name), `model:`, `data:`,
`rollout:`, `reward:`, `eval:`, the trainer's own section (named like the trainer, its dataclass in
`reasoning.recipes.table.TRAINERS`) and `training:` (transformers `TrainingArguments` fields).
Unknown keys are errors that name the key, its section and the closest valid key; values are
checked against the fields' types. Command-line overrides use dotted keys
(`--training.max_steps 10`). Nothing here loads a model or data: that is `reasoning.recipes.build`,
after the checks of `reasoning.recipes.checks`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainingArguments

from reasoning.models.latent_thought import RECIPE_FIELDS as LATENT_THOUGHT_FIELDS
from reasoning.models.lora import lora_config
from reasoning.recipes.table import TRAINERS
from reasoning.rollout import Sampling


class RecipeError(ValueError):
    """A recipe that cannot run; the message says what is wrong and what would be right."""


@dataclass
class ModelConfig:
    """The `model:` section."""

    path: str | None = field(default=None, metadata={"help": "Hugging Face model name or local checkpoint."})
    tiny: str | None = field(
        default=None, metadata={"help": "Build a fresh tiny local model of this size (1m, 3m, 6m, 12m, 25m)."}
    )
    latent_thought: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Build a fresh latent thought model with these LatentThoughtConfig fields, e.g. "
            "{hidden_size: 64, num_layers: 4, latents_per_layer: 4} (character tokenizer, as tiny)."
        },
    )
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or float16."})
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "The trainer's attention kernel (transformers `attn_implementation`): eager, sdpa, "
            "flash_attention_2, flex_attention; default transformers' choice (sdpa). On CPU with short "
            "sequences eager is faster (docs/performance.md). Generation engines choose their own."
        },
    )
    seed: int = field(default=0, metadata={"help": "Initialisation seed of a tiny model."})
    lora: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Train a LoRA adapter instead of the whole model: peft.LoraConfig fields, e.g. "
            "{r: 16, lora_alpha: 32, target_modules: all-linear} ({} for the defaults r 8, alpha 16, all-linear)."
        },
    )


@dataclass
class DataConfig:
    """The `data:` section: training and evaluation records (question, answer, solution)."""

    train: str | None = field(
        default=None,
        metadata={"help": "Hub dataset name, local .jsonl/.parquet file, or synthetic:TASK?key=value&..."},
    )
    split: str = field(default="train", metadata={"help": "Split of a hub dataset."})
    columns: dict[str, str] = field(
        default_factory=dict, metadata={"help": "Map question/answer/solution to the source's column names."}
    )
    limit: int | None = field(default=None, metadata={"help": "Use at most this many training records."})


@dataclass
class RolloutConfig:
    """The `rollout:` section: the generation engine and its sampling settings."""

    engine: str = field(default="hf", metadata={"help": "hf, vllm or vllm-server."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold (1 = off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0 = off)."})
    max_tokens: int = field(default=256, metadata={"help": "Maximum completion length in tokens."})
    engine_kwargs: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "Passed to the engine. vllm: max_model_len defaults to the longest kept training "
            "prompt + max_tokens (+ answer tokens sampled after a trace); a value that cannot hold that, or "
            "one above the model's context, is an error before training."
        },
    )


@dataclass
class RewardConfig:
    """The `reward:` section: which reward functions score completions, and their weights."""

    functions: list[str] = field(
        default_factory=lambda: ["correctness"], metadata={"help": "Reward function names."}
    )
    weights: list[float] | None = field(default=None, metadata={"help": "One weight per function."})
    soft_punish_cache: int | None = field(
        default=None,
        metadata={
            "help": "soft_overlong_punishment (DAPO Eq. 13): L_cache, the last tokens before max_completion_len "
            "over which the penalty falls linearly from 0 to -1. Required with that function."
        },
    )
    max_completion_len: int | None = field(
        default=None,
        metadata={
            "help": "soft_overlong_punishment: L_max, the length that costs -1 (default rollout.max_tokens, "
            "where completions are cut)."
        },
    )


@dataclass
class EvalConfig:
    """The `eval:` section: benchmarks evaluated before and after training."""

    benchmarks: list[str] = field(default_factory=list, metadata={"help": "Benchmark names."})
    n: int = field(default=1, metadata={"help": "Samples per problem."})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy."})
    limit: int | None = field(default=None, metadata={"help": "Problems per benchmark."})
    engine: str = field(default="hf", metadata={"help": "Engine used for evaluation."})
    max_tokens: int | None = field(
        default=None, metadata={"help": "Token budget of a completion (default: each benchmark's own)."}
    )
    engine_kwargs: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "Passed to the evaluation engine: vllm max_model_len (default: the longest prompt + the "
            "budget), hf device (default: the run's device). Lengths are checked before training."
        },
    )
    before: bool = field(default=False, metadata={"help": "Also evaluate the starting model."})
    steps: int | None = field(
        default=None,
        metadata={
            "help": "Also evaluate the policy during training, with the run's own engine: at step 0, every this "
            "many optimizer steps and at the last step (eval/<benchmark>/avg@n, pass@k, maj@n, mean_length "
            "and time/eval in metrics.jsonl, report_to and the report). null = only before/after training."
        },
    )


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "rollout": RolloutConfig,
    "reward": RewardConfig,
    "eval": EvalConfig,
}


@dataclass
class Recipe:
    """A validated recipe."""

    trainer: str
    model: ModelConfig
    data: DataConfig
    rollout: RolloutConfig
    reward: RewardConfig
    eval: EvalConfig
    method: Any
    training: dict[str, Any]
    source: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"trainer": self.trainer}
        for name in SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        out[self.trainer] = dataclasses.asdict(self.method)
        out["training"] = dict(self.training)
        return out


def did_you_mean(key: str, valid: list[str]) -> str:
    """The "; did you mean 'x'?" appended to an error: the closest valid key, else the valid keys."""
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; valid keys: {', '.join(sorted(valid))}"


def _build_section(section: str, cls: type, values: Any) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise RecipeError(
            f"section {section!r} must be a mapping of keys to values, got {type(values).__name__}"
        )
    valid = [f.name for f in fields(cls)]
    for key in values:
        if key not in valid:
            raise RecipeError(f"unknown key {key!r} in section {section!r}{did_you_mean(key, valid)}")
    _check_types(section, cls, values)
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"section {section!r}: {err}") from err


def _expected(value: Any, annotation: Any) -> str | None:
    """None when `value` fits the type `annotation`, else what was expected (e.g. "an integer").

    Knows the types recipes use (bool, int, float, str, None, Literal, unions, list, dict, tuple);
    any other type (enums, classes) is left to the config's own validation.
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return None
    if origin in (typing.Union, types.UnionType):
        wants = [_expected(value, option) for option in args]
        return None if None in wants else " or ".join(dict.fromkeys(wants))
    if annotation is type(None):
        return None if value is None else "null"
    if origin is typing.Literal:
        return None if value in args else "one of " + ", ".join(repr(a) for a in args)
    simple = {
        bool: ("true or false", lambda v: isinstance(v, bool)),
        int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
        float: ("a number", lambda v: isinstance(v, int | float) and not isinstance(v, bool)),
        str: ("a string", lambda v: isinstance(v, str)),
    }
    if annotation in simple:
        text, fits = simple[annotation]
        return None if fits(value) else text
    if annotation is list or origin is list or annotation is tuple or origin is tuple:
        if not isinstance(value, list | tuple):
            return "a list"
        if args and origin is list:
            inner = [_expected(item, args[0]) for item in value]
            wrong = next((w for w in inner if w is not None), None)
            return None if wrong is None else f"a list of items each {wrong}"
        return None
    if annotation is dict or origin is dict:
        return None if isinstance(value, dict) else "a mapping"
    return None


def _check_types(section: str, cls: type, values: dict[str, Any]) -> None:
    """Each value has its field's declared type; otherwise a RecipeError naming key, value and type."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # a config whose annotations cannot be resolved is checked by its own code only
        return
    for key, value in values.items():
        expected = _expected(value, hints.get(key, Any))
        if expected is not None:
            raise RecipeError(
                f"{section}.{key} must be {expected}, got {value!r:.80} ({type(value).__name__})"
            )


def _training_fields() -> list[str]:
    return [f.name for f in fields(TrainingArguments) if f.init]


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `--section.key value` pairs (values parsed as YAML scalars) to a raw recipe dict."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    items = list(overrides)
    i = 0
    while i < len(items):
        token = items[i]
        if not token.startswith("--"):
            raise RecipeError(f"override {token!r} must look like --section.key value")
        token = token[2:]
        if "=" in token:
            dotted, value = token.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(items):
                raise RecipeError(f"override --{token} has no value")
            dotted, value = token, items[i + 1]
            i += 2
        if "." not in dotted:
            if dotted == "trainer":
                raw["trainer"] = value
                continue
            raise RecipeError(f"override --{dotted} must name a section and a key, e.g. --training.max_steps")
        section, key = dotted.split(".", 1)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise RecipeError(f"cannot override {dotted}: section {section!r} is not a mapping")
        raw[section][key] = _scalar(yaml.safe_load(value))
    return raw


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _scalar(value: Any) -> Any:
    """YAML 1.1 reads `1e-5` as a string; numbers written that way are meant as floats."""
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        return float(value)
    return value


def _coerce(values: Any) -> Any:
    if isinstance(values, dict):
        return {k: _coerce(v) for k, v in values.items()}
    if isinstance(values, list):
        return [_coerce(v) for v in values]
    return _scalar(values)


def parse_recipe(raw: dict[str, Any], source: Path | None = None) -> Recipe:
    """Validate a raw recipe dict: unknown sections and keys are errors naming the closest valid one."""
    if not isinstance(raw, dict):
        raise RecipeError("a recipe must be a YAML mapping with a 'trainer:' key")
    trainer = raw.get("trainer")
    if trainer not in TRAINERS:
        raise RecipeError(f"unknown trainer {trainer!r}; choose one of {', '.join(sorted(TRAINERS))}")
    valid_sections = ["trainer", *SECTIONS, trainer, "training"]
    for section in raw:
        if section not in valid_sections:
            raise RecipeError(f"unknown section {section!r}{did_you_mean(section, valid_sections)}")
    built = {name: _build_section(name, cls, raw.get(name)) for name, cls in SECTIONS.items()}
    method = _build_section(trainer, TRAINERS[trainer].config, raw.get(trainer))
    training = raw.get("training") or {}
    if not isinstance(training, dict):
        raise RecipeError(
            f"section 'training' must be a mapping of keys to values, got {type(training).__name__}"
        )
    valid_training = _training_fields()
    for key in training:
        if key not in valid_training:
            raise RecipeError(f"unknown key {key!r} in section 'training'{did_you_mean(key, valid_training)}")
    _check_types("training", TrainingArguments, training)
    if built["model"].lora is not None:
        _check_lora(built["model"])
    if built["model"].latent_thought is not None:
        _check_latent_thought_model(built["model"])
    elif built["model"].path is None and built["model"].tiny is None:
        raise RecipeError(
            "section 'model' needs 'path' (hub name or checkpoint) or 'tiny' (e.g. tiny: 1m) "
            "or 'latent_thought' (e.g. latent_thought: {hidden_size: 64})"
        )
    return Recipe(trainer=trainer, method=method, training=dict(training), source=source, **built)


def _check_lora(config: ModelConfig) -> None:
    if not isinstance(config.lora, dict):
        raise RecipeError(
            "model.lora must be a mapping of peft.LoraConfig fields, e.g. {r: 16, lora_alpha: 32}"
        )
    try:
        lora_config(config.lora)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"section 'model.lora': {err}") from err


def _check_latent_thought_model(config: ModelConfig) -> None:
    """`model.latent_thought` is a mapping of LatentThoughtConfig fields and the model's only source."""
    if not isinstance(config.latent_thought, dict):
        raise RecipeError("model.latent_thought must be a mapping, e.g. {hidden_size: 64, num_layers: 4}")
    if config.path is not None or config.tiny is not None:
        raise RecipeError("section 'model': give one of 'path', 'tiny' and 'latent_thought', not several")
    for key in config.latent_thought:
        if key not in LATENT_THOUGHT_FIELDS:
            raise RecipeError(
                f"unknown key {key!r} in section 'model.latent_thought'{did_you_mean(key, list(LATENT_THOUGHT_FIELDS))}"
            )


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply dotted overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(
            f"recipe file {str(path)!r} does not exist" + (" (it is a directory)" if path.is_dir() else "")
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise RecipeError(f"recipe {str(path)!r} is not valid YAML: {err}") from err
    if raw is not None and not isinstance(raw, dict):
        raise RecipeError(
            f"recipe {str(path)!r} must be a YAML mapping with a 'trainer:' key, got a {type(raw).__name__}"
        )
    return parse_recipe(apply_overrides(_coerce(raw or {}), overrides or []), source=path)


def training_values(recipe: Recipe) -> dict[str, Any]:
    """The `training:` section with defaults suited to this toolkit (TrainingArguments fields)."""
    return {
        "output_dir": f"runs/{recipe.trainer}",
        "report_to": "none",
        "logging_steps": 10,
        "save_total_limit": 2,
        "disable_tqdm": False,
        **recipe.training,
    }


def training_arguments(recipe: Recipe) -> TrainingArguments:
    """TrainingArguments from the `training:` section, with defaults suited to this toolkit."""
    values = training_values(recipe)
    try:
        return TrainingArguments(**values)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"section 'training': {err}") from err


def build_sampling(recipe: Recipe, seed: int) -> Sampling:
    """The `rollout:` section's sampling settings, checked (`Sampling` validates them)."""
    config = recipe.rollout
    try:
        return Sampling(
            temperature=config.temperature,
            top_p=config.top_p,
            top_k=config.top_k,
            max_tokens=config.max_tokens,
            seed=seed,
        )
    except ValueError as err:
        raise RecipeError(f"section 'rollout': {err}") from err
