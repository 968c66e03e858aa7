"""YAML recipe -> validated configuration -> trainer run.

A recipe is one YAML file with the sections `trainer:` (the trainer's name), `model:`, `data:`,
`rollout:`, `reward:`, `eval:`, the trainer's own section (named like the trainer) and
`training:` (transformers `TrainingArguments` fields). Unknown keys are errors that name the
key, its section and the closest valid key. Command-line overrides use dotted keys
(`--training.max_steps 10`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainingArguments


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


def trainer_configs() -> dict[str, type]:
    """Trainer name -> its config dataclass (the recipe section named like the trainer)."""
    from reasoning.trainers.bayes import BayesConfig
    from reasoning.trainers.covrl import CoVRLConfig
    from reasoning.trainers.gflownet import GFlowNetConfig
    from reasoning.trainers.grpo import GRPOConfig
    from reasoning.trainers.latent_thought import DualRateConfig
    from reasoning.trainers.sft import SFTConfig
    from reasoning.trainers.variational import VariationalConfig
    from reasoning.trainers.variational_online import OnlineVariationalConfig

    return {
        "sft": SFTConfig,
        "grpo": GRPOConfig,
        "variational": VariationalConfig,
        "variational_online": OnlineVariationalConfig,
        "gflownet": GFlowNetConfig,
        "latent_thought": DualRateConfig,
        "covrl": CoVRLConfig,
        "bayes": BayesConfig,
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


def _closest(key: str, valid: list[str]) -> str:
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
            raise RecipeError(f"unknown key {key!r} in section {section!r}{_closest(key, valid)}")
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
    configs = trainer_configs()
    trainer = raw.get("trainer")
    if trainer not in configs:
        raise RecipeError(f"unknown trainer {trainer!r}; choose one of {', '.join(sorted(configs))}")
    valid_sections = ["trainer", *SECTIONS, trainer, "training"]
    for section in raw:
        if section not in valid_sections:
            raise RecipeError(f"unknown section {section!r}{_closest(section, valid_sections)}")
    built = {name: _build_section(name, cls, raw.get(name)) for name, cls in SECTIONS.items()}
    method = _build_section(trainer, configs[trainer], raw.get(trainer))
    training = raw.get("training") or {}
    if not isinstance(training, dict):
        raise RecipeError(
            f"section 'training' must be a mapping of keys to values, got {type(training).__name__}"
        )
    valid_training = _training_fields()
    for key in training:
        if key not in valid_training:
            raise RecipeError(f"unknown key {key!r} in section 'training'{_closest(key, valid_training)}")
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
    from reasoning.models.lora import lora_config

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
    from reasoning.models.latent_thought import RECIPE_FIELDS

    if not isinstance(config.latent_thought, dict):
        raise RecipeError("model.latent_thought must be a mapping, e.g. {hidden_size: 64, num_layers: 4}")
    if config.path is not None or config.tiny is not None:
        raise RecipeError("section 'model': give one of 'path', 'tiny' and 'latent_thought', not several")
    for key in config.latent_thought:
        if key not in RECIPE_FIELDS:
            raise RecipeError(
                f"unknown key {key!r} in section 'model.latent_thought'{_closest(key, list(RECIPE_FIELDS))}"
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


# ---------------------------------------------------------------------------------------------
# Building and running


def _build_once(folder: Path, build: typing.Callable[[Path], Any]) -> None:
    """`build(path)` a checkpoint at `folder` unless one is there, safely when several ranks run the
    recipe. With a process group (transformers then writes weights on global rank 0 only) rank 0
    builds while the others wait; without one, ranks may race: each builds into its own folder and
    renames it into place, the first rename wins (same seed, same model) and the others are removed."""
    import os
    import shutil

    import torch
    from transformers.integrations import deepspeed as hf_deepspeed

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not (folder / "config.json").exists() and (not distributed or torch.distributed.get_rank() == 0):
        own = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
        # Built whole: under a ZeRO-3 config transformers would partition the new model at construction
        # and save only shards. The config is restored for the real load.
        zero3 = hf_deepspeed._hf_deepspeed_config_weak_ref
        hf_deepspeed.unset_hf_deepspeed_config()
        try:
            build(own)
        finally:
            hf_deepspeed._hf_deepspeed_config_weak_ref = zero3
        try:
            os.rename(own, folder)  # atomic; fails when another rank's folder is already in place
        except OSError:
            shutil.rmtree(own, ignore_errors=True)
    if distributed:
        torch.distributed.barrier()


ATTENTION_KERNELS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def load_model_and_tokenizer(config: ModelConfig, run_dir: Path):
    """The recipe's model and tokenizer; a tiny model is built once under `<run_dir>/init`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import reasoning.models.latent_thought  # noqa: F401  (registers the latent thought model with Auto*)

    if config.tiny is not None:
        from reasoning.models.tiny import build_tiny_model

        init = run_dir / "init"
        _build_once(init, lambda folder: build_tiny_model(config.tiny, folder, seed=config.seed))
        path = str(init)
    elif config.latent_thought is not None:
        from reasoning.models.latent_thought import build_latent_thought_checkpoint

        init = run_dir / "init"
        try:
            _build_once(
                init,
                lambda folder: build_latent_thought_checkpoint(
                    folder, seed=config.seed, **config.latent_thought
                ),
            )
        except ValueError as err:
            raise RecipeError(f"section 'model.latent_thought': {err}") from err
        path = str(init)
    else:
        path = config.path
    dtype = getattr(torch, config.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise RecipeError(
            f"model.dtype {config.dtype!r} is not a torch dtype; use float32, bfloat16 or float16"
        )
    try:
        attention = {"attn_implementation": config.attn_implementation} if config.attn_implementation else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **attention)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:  # not found locally nor on the hub, or not a model checkpoint
        raise RecipeError(
            f"model.path {path!r} cannot be loaded as a local checkpoint or hub model: {err}"
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if config.lora is not None:
        from reasoning.models.lora import apply_lora

        model = apply_lora(model, config.lora)  # engines load `path` (the base) and sync merged weights
    return model, tokenizer, path


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


def latest_checkpoint(run_dir: Path) -> str | None:
    """The newest complete `checkpoint-N` directory under `run_dir`, to resume from after a crash
    (one whose save was interrupted has no completion marker and is skipped)."""
    from reasoning.trainers.checkpoint import latest_complete_checkpoint

    return latest_complete_checkpoint(run_dir)


def rollout_trainer_classes() -> dict[str, type]:
    """Trainer name -> its RolloutTrainer class (the trainers that sample their own rollouts)."""
    from reasoning.trainers.bayes import BayesTrainer
    from reasoning.trainers.covrl import CoVRLTrainer
    from reasoning.trainers.gflownet import GFlowNetTrainer
    from reasoning.trainers.grpo import GRPOTrainer
    from reasoning.trainers.variational_online import OnlineVariationalTrainer

    return {
        "grpo": GRPOTrainer,
        "gflownet": GFlowNetTrainer,
        "covrl": CoVRLTrainer,
        "bayes": BayesTrainer,
        "variational_online": OnlineVariationalTrainer,
    }


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
    import torch

    from reasoning.eval.benchmarks import BENCHMARKS
    from reasoning.models.tiny import TINY_SIZES
    from reasoning.rollout import ENGINE_KINDS
    from reasoning.trainers.base import RolloutTrainerConfig

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
        from huggingface_hub import constants, try_to_load_from_cache

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
                f"{section}.engine {engine!r} is not a rollout engine{_closest(engine, list(ENGINE_KINDS))}"
            )
    unknown = [name for name in recipe.eval.benchmarks if name not in BENCHMARKS]
    if unknown:
        raise RecipeError(
            f"unknown benchmark(s) {unknown} in eval.benchmarks{_closest(unknown[0], list(BENCHMARKS))}"
        )
    if recipe.eval.n < 1:
        raise RecipeError(f"eval.n must be at least 1, got {recipe.eval.n}")
    _check_eval_engine(recipe.eval)
    if recipe.eval.steps is not None:
        _check_eval_steps(recipe)
    if recipe.data.limit is not None and recipe.data.limit < 1:
        raise RecipeError(f"data.limit must be at least 1 (or null for all records), got {recipe.data.limit}")
    functions = reward_functions(recipe.reward)
    weights = recipe.reward.weights
    if weights is not None and len(weights) != len(functions):
        raise RecipeError(
            f"reward.weights has {len(weights)} values for {len(functions)} reward.functions "
            f"{recipe.reward.functions}; give one weight per function"
        )
    check_launch(recipe)  # before TrainingArguments, which sets DeepSpeed up under a DeepSpeed launch
    args = training_arguments(recipe)
    if args.learning_rate < 0:
        raise RecipeError(f"training.learning_rate must not be negative, got {args.learning_rate}")
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(args, key) < 1:
            raise RecipeError(f"training.{key} must be at least 1, got {getattr(args, key)}")
    config, name = recipe.method, recipe.trainer
    if isinstance(config, RolloutTrainerConfig):
        _check_generation_sizes(name, config, args)
        trainer_class = rollout_trainer_classes().get(name)
        if trainer_class is not None:
            if trainer_class.needs_rewards and not functions:
                raise RecipeError(f"trainer {name!r} needs at least one reward function in reward.functions")
            rollout = recipe.rollout
            if (rollout.top_k or rollout.top_p < 1) and not trainer_class.scores_top_k_top_p:
                raise RecipeError(
                    f"trainer {name!r} scores completions with the temperature only, so rollout.top_k "
                    f"({rollout.top_k}) and rollout.top_p ({rollout.top_p}) must be 0 and 1: the importance "
                    "ratios would compare different distributions"
                )
        build_sampling(recipe, args.seed)
    return args


def _check_eval_steps(recipe: Recipe) -> None:
    """`eval.steps` evaluates one policy, trained by optimizer steps, that generates text."""
    steps, trainer = recipe.eval.steps, recipe.trainer
    if steps < 1:
        raise RecipeError(
            f"eval.steps must be at least 1 (or null: evaluate only before/after training), got {steps}"
        )
    if not recipe.eval.benchmarks:
        raise RecipeError(
            "eval.steps evaluates eval.benchmarks during training, but eval.benchmarks is empty; name some "
            "(e.g. eval.benchmarks: [addition]) or remove eval.steps"
        )
    if trainer == "variational":
        raise RecipeError(
            "eval.steps needs a trainer that trains one policy step by step; trainer 'variational' is a pipeline "
            "of stages (prior, posterior and final SFT, each its own model). Remove eval.steps: the final model "
            "is evaluated on eval.benchmarks after training"
        )
    if trainer == "latent_thought":
        raise RecipeError(
            "eval.steps evaluates a policy that answers by generation alone; a latent thought model answers "
            "through posterior inference over its latent vectors. Remove eval.steps and use "
            "latent_thought.heldout (ELBO perplexity bound and few-shot accuracy after training)"
        )


def check_launch(recipe: Recipe, env: typing.Mapping[str, str] | None = None) -> None:
    """What the launch (the environment `accelerate launch` / torchrun set) must agree with.

    The variational pipeline runs in one process without DeepSpeed (`single_process_problem`); a
    DeepSpeed launch's mixed precision must be the recipe's (`check_launch_precision`).
    """
    values = training_values(recipe)
    if recipe.trainer == "variational":
        from reasoning.trainers.variational import single_process_problem

        problem = single_process_problem(values, env)
        if problem is not None:
            raise RecipeError(f"trainer 'variational': {problem}")
    check_launch_precision(values, env)


# `accelerate launch` mixed precision -> the TrainingArguments flag that must be on (fp8 trains in bf16 autocast)
_PRECISION_FLAGS = {"bf16": "bf16", "fp16": "fp16", "fp8": "bf16"}


def _deepspeed_config(value: Any) -> dict | None:
    """`training.deepspeed` as a dict (it may be a JSON file's path); None when absent or unreadable."""
    import json

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
    recipe_flags = {key: bool(training.get(key) or training.get(f"{key}_full_eval")) for key in ("bf16", "fp16")}
    config = _deepspeed_config(training.get("deepspeed"))
    for key in ("bf16", "fp16"):
        section = (config or {}).get(key)
        value = section.get("enabled") if isinstance(section, dict) else None
        if value is not None and value != "auto" and value != recipe_flags[key]:
            raise RecipeError(
                f"training.deepspeed sets {key}.enabled: {value} but training.{key} is {recipe_flags[key]}: "
                "transformers stops such a run when training starts (\"DeepSpeed config values that mismatch "
                f"TrainingArguments values\"). Set training.{key}: {str(value).lower()}, or {key}.enabled: auto "
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
            f"the run once the model is loaded (\"ds {flag}.enabled=True vs hf {flag}|{flag}_full_eval=False\"). "
            f"Set training.{flag}: true{' and training.' + recipe_precision + ': false' if recipe_precision else ''} "
            f"in the recipe (or pass --training.{flag} true), or launch with --mixed_precision "
            f"{recipe_precision or 'no'}"
        )


def _check_generation_sizes(name: str, config: Any, args: TrainingArguments) -> None:
    batch, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    group, steps = config.num_generations, config.steps_per_generation
    for key, value in (
        (f"{name}.num_generations", group),
        (f"{name}.num_iterations", config.num_iterations),
        (f"{name}.steps_per_generation", steps if steps is not None else 1),
    ):
        if value < 1:
            raise RecipeError(f"{key} must be at least 1, got {value}")
    steps = steps or accumulation
    if steps % accumulation:
        raise RecipeError(
            f"{name}.steps_per_generation ({steps}) must be a multiple of training.gradient_accumulation_steps "
            f"({accumulation}); set it to {accumulation * max(1, round(steps / accumulation))} or leave it unset"
        )
    completions = batch * steps
    if completions % group:
        fitting_batch = next(b for b in range(batch, batch + group + 1) if (b * steps) % group == 0)
        fitting_group = max(g for g in range(1, group + 1) if completions % g == 0)
        raise RecipeError(
            f"one generation makes training.per_device_train_batch_size × steps_per_generation = {batch} × "
            f"{steps} = {completions} completions, which is not a multiple of {name}.num_generations = "
            f"{group} (the group size); set training.per_device_train_batch_size to {fitting_batch}, or "
            f"{name}.num_generations to {fitting_group}"
        )


def load_training_records(recipe: Recipe, args: TrainingArguments):
    """The `data:` section's records, checked: loadable, non-empty, enough for one generation."""
    from reasoning.data.datasets import DataError, load_records
    from reasoning.trainers.base import RolloutTrainerConfig

    data = recipe.data
    if data.train is None:
        raise RecipeError("section 'data' needs 'train' (dataset name, file or synthetic:TASK)")
    try:
        records = load_records(data.train, data.columns or None, data.split, data.limit)
    except (DataError, FileNotFoundError) as err:
        raise RecipeError(f"section 'data': {err}") from err
    if "code" in recipe.reward.functions and "tests" not in records.column_names:
        raise RecipeError(
            f"reward function 'code' runs each completion against the test cases in the data column 'tests', "
            f"which {data.train!r} does not have (columns: {', '.join(records.column_names)})"
        )
    config = recipe.method
    if isinstance(config, RolloutTrainerConfig):
        steps = config.steps_per_generation or args.gradient_accumulation_steps
        needed = args.per_device_train_batch_size * steps // config.num_generations * args.world_size
        if len(records) < needed:
            raise RecipeError(
                f"data.train {data.train!r} has {len(records)} records but one generation needs {needed} "
                f"prompts (per_device_train_batch_size × steps_per_generation / num_generations × "
                f"{args.world_size} process(es)); add data or lower training.per_device_train_batch_size"
            )
    return records


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
    from reasoning.data.templates import encode, template_for
    from reasoning.rollout import context_length
    from reasoning.trainers.base import RolloutTrainerConfig

    config, name = recipe.method, recipe.trainer
    if not isinstance(config, RolloutTrainerConfig):
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
    from reasoning.data.templates import template_for
    from reasoning.eval.benchmarks import BENCHMARKS, BenchmarkUnavailableError, load_benchmark
    from reasoning.eval.evaluate import check_model_context, length_needs, vllm_lengths
    from reasoning.rollout import context_length

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


def _lend_for_evaluation(recipe: Recipe, rollout_len: int, eval_len: int) -> int:
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


@contextlib.contextmanager
def _whole_models() -> typing.Iterator[None]:
    """Models loaded in the block are whole, as an evaluation engine needs: under a ZeRO-3 config
    transformers would partition them at construction (`zero.Init`, a collective, which rank 0
    evaluating alone after training would wait on forever). The config is restored afterwards."""
    from transformers.integrations import deepspeed as hf_deepspeed

    zero3 = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = zero3


def run(recipe: Recipe, console=None) -> dict[str, Any]:
    """Train as the recipe says; evaluate; return a summary. Resumes from the last checkpoint."""
    import json
    import time

    from rich.console import Console

    from reasoning.eval.evaluate import evaluate
    from reasoning.trainers.callbacks import JsonlMetricsCallback, attach_run_callbacks
    from reasoning.trainers.checkpoint import save_final_model
    from reasoning.trainers.evaluation import step_evaluation

    console = console or Console(stderr=True)
    args = check_recipe(recipe)  # everything that can be checked before a model is built
    run_dir = Path(args.output_dir)
    final_dir = run_dir / "final"
    records = None if (final_dir / "config.json").exists() else load_training_records(recipe, args)
    run_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"run_dir": str(run_dir), "trainer": recipe.trainer}
    model, tokenizer, start_path = load_model_and_tokenizer(recipe.model, run_dir)
    rollout_len = None  # the rollout engine's max_model_len need (prompt + generated tokens)
    if records is not None:  # checks that need the tokenizer and the model's context, before any work
        rollout_len = check_prompt_lengths(recipe, records, model, tokenizer)
    eval_len = check_eval_lengths(recipe, model, tokenizer)
    if rollout_len is not None and eval_len is not None and recipe.eval.steps is not None:
        rollout_len = _lend_for_evaluation(recipe, rollout_len, eval_len)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))

    def run_eval(path: str, name: str) -> dict[str, Any] | None:
        if not recipe.eval.benchmarks:
            return None
        with _whole_models():
            return evaluate(
                path,
                recipe.eval.benchmarks,
                n=recipe.eval.n,
                temperature=recipe.eval.temperature,
                limit=recipe.eval.limit,
                max_tokens=recipe.eval.max_tokens,
                engine=recipe.eval.engine,
                engine_kwargs=recipe.eval.engine_kwargs or None,
                dtype=recipe.model.dtype,
                output_dir=run_dir / "eval" / name,
                console=console,
            )

    if recipe.eval.before:
        summary["before"] = run_eval(start_path, "before")
    if (final_dir / "config.json").exists():
        console.print(f"[yellow]{final_dir} exists: training already finished, skipping to evaluation")
    else:
        if recipe.trainer == "variational":
            start = time.monotonic()
            summary["stages"] = build_pipeline(recipe, records, start_path, console).run()
            summary["train_seconds"] = time.monotonic() - start
            summary["after"] = run_eval(str(final_dir), "final")
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
            write_run_report(run_dir, console)
            return summary
        callbacks = [JsonlMetricsCallback(run_dir / "metrics.jsonl")]
        trainer = build_trainer(
            recipe, model, tokenizer, records, args, callbacks, start_path, max_model_len=rollout_len
        )
        attach_run_callbacks(trainer)  # key metrics in the progress bar; completions to report_to
        if recipe.eval.steps is not None:  # after JsonlMetricsCallback: it rewinds metrics.jsonl first
            trainer.add_callback(step_evaluation(trainer, recipe.eval))
        start = time.monotonic()
        try:
            trainer.train(resume_from_checkpoint=latest_checkpoint(run_dir))
            summary["train_seconds"] = time.monotonic() - start
            save_final_model(trainer, final_dir, tokenizer)  # atomic: final/ appears whole or not at all
        finally:
            engine = getattr(trainer, "engine", None)
            if engine is not None:
                engine.close()
    if not _end_distributed():  # evaluation, summary and report: once, by rank 0
        return summary
    summary["after"] = run_eval(str(final_dir), "final")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    write_run_report(run_dir, console)
    return summary


def write_run_report(run_dir: Path, console) -> Path | None:
    """`<run_dir>/report.html` (curves, timing, evaluation, completions) and `<run_dir>/plots/*.png`
    at the end of a run, on the main process. A report that cannot be drawn is a warning: the run's
    checkpoints and results are already on disk."""
    from reasoning.report import write_report

    if int(os.environ.get("RANK", "0")) != 0:
        return None
    try:
        path = write_report([run_dir], run_dir / "report.html", plots_dir=run_dir / "plots")
    except Exception as err:  # noqa: BLE001 - a plotting failure must not fail a finished run
        console.print(f"[yellow]warning: no report for {run_dir}: {err}")
        return None
    console.print(f"report: {path}")
    return path


def _end_distributed() -> bool:
    """After training under a multi-process launch: tear the process group down and say whether this
    is rank 0, which alone evaluates and writes the summary (every rank would otherwise evaluate and
    write the same files). Left to interpreter exit, a DeepSpeed run on CPU aborts a rank ("terminate
    called without an active exception"). A world-size-1 group (e.g. an in-process vLLM engine's) is
    left alone."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            rank = torch.distributed.get_rank()
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
            return rank == 0
        return True
    return int(os.environ.get("RANK", "0")) == 0


def reward_functions(config: RewardConfig) -> list:
    """The recipe's reward functions, by name (a plain mapping)."""
    from reasoning.rewards.code import code_reward
    from reasoning.rewards.format import boxed_format_reward, tagged_answer_format_reward
    from reasoning.rewards.verifier import correctness, reference_steps

    available = {
        "correctness": correctness,
        "reference_steps": reference_steps,
        "boxed_format": boxed_format_reward,
        "answer_format": tagged_answer_format_reward(),
        "code": code_reward,  # sandboxed execution against the dataset's `tests` column
    }
    unknown = [name for name in config.functions if name not in available]
    if unknown:
        raise RecipeError(
            f"unknown reward function(s) {unknown} in section 'reward'; choose from {sorted(available)}"
        )
    return [available[name] for name in config.functions]


def build_engine(recipe: Recipe, model, tokenizer, model_path: str, max_model_len: int | None = None):
    """The rollout engine: `hf` wraps the live policy; `vllm` loads the starting checkpoint.

    `max_model_len`: what the rollouts need (`check_prompt_lengths`: longest kept prompt + generated
    tokens). A `vllm` engine gets it unless rollout.engine_kwargs sets its own (without either: the
    model's context); an engine with a smaller `max_model_len` of its own (vLLM servers) is an error,
    since its completions would stop early with finish reason "length".
    """
    from reasoning.rollout import make_engine
    from reasoning.rollout.hf import HFEngine

    config = recipe.rollout
    try:
        if config.engine == "hf":
            return HFEngine(model=model, tokenizer=tokenizer, **config.engine_kwargs)
        kwargs = {"dtype": recipe.model.dtype, **config.engine_kwargs}
        if config.engine == "vllm" and max_model_len is not None:
            kwargs.setdefault("max_model_len", max_model_len)
        engine = make_engine(config.engine, model_path, **kwargs)
        limit = getattr(engine, "max_model_len", None)
        if max_model_len is not None and isinstance(limit, int) and limit < max_model_len:
            engine.close()
            raise RecipeError(
                f"the {config.engine} engine's max_model_len is {limit} tokens, but the rollouts need "
                f"{max_model_len} (the longest kept prompt + rollout.max_tokens): completions would stop early "
                f"with finish reason 'length'; serve the model with --max-model-len {max_model_len}, or lower "
                f"rollout.max_tokens or {recipe.trainer}.max_prompt_length"
            )
        return engine
    except TypeError as err:
        raise RecipeError(
            f"section 'rollout': engine_kwargs {sorted(config.engine_kwargs)} are not all accepted by the "
            f"{config.engine!r} engine ({err}); remove the ones it does not take (e.g. vLLM's max_model_len "
            "with engine 'hf': `--rollout.engine_kwargs '{}'`)"
        ) from err
    except ValueError as err:
        raise RecipeError(f"section 'rollout': {err}") from err


def build_sampling(recipe: Recipe, seed: int):
    from reasoning.rollout import Sampling

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


def build_pipeline(recipe: Recipe, records, base_path: str, console=None):
    """The variational-reasoning pipeline of a `trainer: variational` recipe."""
    from reasoning.trainers.variational import VariationalReasoningPipeline

    def engine_for(path: str, model, tokenizer):
        return build_engine(recipe, model, tokenizer, path)

    try:
        return VariationalReasoningPipeline(
            recipe.method,
            base_path,
            records,
            training_values(recipe),
            engine_for,
            trace_max_tokens=recipe.rollout.max_tokens,
            console=console,
            dtype=recipe.model.dtype,
            lora=recipe.model.lora,
        )
    except ValueError as err:  # the constructor checks the data against the recipe (e.g. hint_column)
        raise RecipeError(f"trainer 'variational': {err}") from err


def build_trainer(
    recipe: Recipe,
    model,
    tokenizer,
    records,
    args: TrainingArguments,
    callbacks: list,
    model_path: str,
    max_model_len: int | None = None,
):
    """The trainer object for `recipe.trainer`; `max_model_len` goes to `build_engine`."""
    from reasoning.trainers.sft import make_sft_trainer

    if recipe.trainer == "sft":
        return make_sft_trainer(model, tokenizer, records, args, recipe.method, callbacks=callbacks)
    if recipe.trainer == "latent_thought":
        from reasoning.trainers.latent_thought import make_latent_thought_trainer

        try:
            return make_latent_thought_trainer(model, tokenizer, records, args, recipe.method, callbacks)
        except ValueError as err:
            raise RecipeError(f"trainer 'latent_thought': {err}") from err
    trainer_class = rollout_trainer_classes()[recipe.trainer]
    try:
        return trainer_class(
            model=model,
            args=args,
            config=recipe.method,
            train_dataset=records,
            processing_class=tokenizer,
            reward_funcs=reward_functions(recipe.reward),
            reward_weights=recipe.reward.weights,
            engine=build_engine(recipe, model, tokenizer, model_path, max_model_len),
            sampling=build_sampling(recipe, args.seed),
            callbacks=callbacks,
        )
    except ValueError as err:
        raise RecipeError(f"trainer {recipe.trainer!r}: {err}") from err
