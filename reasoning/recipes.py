"""YAML recipe -> validated configuration -> trainer run.

A recipe is one YAML file with the sections `trainer:` (the trainer's name), `model:`, `data:`,
`rollout:`, `reward:`, `eval:`, the trainer's own section (named like the trainer) and
`training:` (transformers `TrainingArguments` fields). Unknown keys are errors that name the
key, its section and the closest valid key. Command-line overrides use dotted keys
(`--training.max_steps 10`).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
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
    seed: int = field(default=0, metadata={"help": "Initialisation seed of a tiny model."})


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
    engine_kwargs: dict[str, Any] = field(default_factory=dict, metadata={"help": "Passed to the engine."})


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
    before: bool = field(default=False, metadata={"help": "Also evaluate the starting model."})


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

    return {
        "sft": SFTConfig,
        "grpo": GRPOConfig,
        "variational": VariationalConfig,
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
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"section {section!r}: {err}") from err


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
    valid_training = _training_fields()
    for key in training:
        if key not in valid_training:
            raise RecipeError(f"unknown key {key!r} in section 'training'{_closest(key, valid_training)}")
    if built["model"].latent_thought is not None:
        _check_latent_thought_model(built["model"])
    elif built["model"].path is None and built["model"].tiny is None:
        raise RecipeError(
            "section 'model' needs 'path' (hub name or checkpoint) or 'tiny' (e.g. tiny: 1m) "
            "or 'latent_thought' (e.g. latent_thought: {hidden_size: 64})"
        )
    return Recipe(trainer=trainer, method=method, training=dict(training), source=source, **built)


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
    if not path.exists():
        raise RecipeError(f"recipe file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {str(path)!r} is not valid YAML: {err}") from err
    return parse_recipe(apply_overrides(_coerce(raw or {}), overrides or []), source=path)


# ---------------------------------------------------------------------------------------------
# Building and running


def load_model_and_tokenizer(config: ModelConfig, run_dir: Path):
    """The recipe's model and tokenizer; a tiny model is built once under `<run_dir>/init`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import reasoning.models.latent_thought  # noqa: F401  (registers the latent thought model with Auto*)

    if config.tiny is not None:
        from reasoning.models.tiny import build_tiny_model

        init = run_dir / "init"
        if not (init / "config.json").exists():
            build_tiny_model(config.tiny, init, seed=config.seed)
        path = str(init)
    elif config.latent_thought is not None:
        from reasoning.models.latent_thought import build_latent_thought_checkpoint

        init = run_dir / "init"
        if not (init / "config.json").exists():
            try:
                build_latent_thought_checkpoint(init, seed=config.seed, **config.latent_thought)
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
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
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
    """The newest `checkpoint-N` directory under `run_dir`, to resume from after a crash."""
    checkpoints = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(checkpoints[-1]) if checkpoints else None


def run(recipe: Recipe, console=None) -> dict[str, Any]:
    """Train as the recipe says; evaluate; return a summary. Resumes from the last checkpoint."""
    import json
    import time

    from rich.console import Console

    from reasoning.data.datasets import load_records
    from reasoning.eval.evaluate import evaluate
    from reasoning.trainers.callbacks import JsonlMetricsCallback

    console = console or Console(stderr=True)
    args = training_arguments(recipe)
    run_dir = Path(args.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    final_dir = run_dir / "final"
    summary: dict[str, Any] = {"run_dir": str(run_dir), "trainer": recipe.trainer}
    model, tokenizer, start_path = load_model_and_tokenizer(recipe.model, run_dir)

    def run_eval(path: str, name: str) -> dict[str, Any] | None:
        if not recipe.eval.benchmarks:
            return None
        return evaluate(
            path,
            recipe.eval.benchmarks,
            n=recipe.eval.n,
            temperature=recipe.eval.temperature,
            limit=recipe.eval.limit,
            engine=recipe.eval.engine,
            dtype=recipe.model.dtype,
            output_dir=run_dir / "eval" / name,
            console=console,
        )

    if recipe.eval.before:
        summary["before"] = run_eval(start_path, "before")
    if (final_dir / "config.json").exists():
        console.print(f"[yellow]{final_dir} exists: training already finished, skipping to evaluation")
    else:
        if recipe.data.train is None:
            raise RecipeError("section 'data' needs 'train' (dataset name, file or synthetic:TASK)")
        records = load_records(
            recipe.data.train, recipe.data.columns or None, recipe.data.split, recipe.data.limit
        )
        if recipe.trainer == "variational":
            start = time.monotonic()
            summary["stages"] = build_pipeline(recipe, records, start_path, console).run()
            summary["train_seconds"] = time.monotonic() - start
            summary["after"] = run_eval(str(final_dir), "final")
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
            return summary
        callbacks = [JsonlMetricsCallback(run_dir / "metrics.jsonl")]
        trainer = build_trainer(recipe, model, tokenizer, records, args, callbacks, start_path)
        start = time.monotonic()
        try:
            trainer.train(resume_from_checkpoint=latest_checkpoint(run_dir))
            summary["train_seconds"] = time.monotonic() - start
            trainer.save_model(str(final_dir))
            tokenizer.save_pretrained(final_dir)
        finally:
            engine = getattr(trainer, "engine", None)
            if engine is not None:
                engine.close()
    summary["after"] = run_eval(str(final_dir), "final")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def reward_functions(config: RewardConfig) -> list:
    """The recipe's reward functions, by name (a plain mapping)."""
    from reasoning.rewards.format import boxed_format_reward, tagged_answer_format_reward
    from reasoning.rewards.verifier import correctness, reference_steps

    available = {
        "correctness": correctness,
        "reference_steps": reference_steps,
        "boxed_format": boxed_format_reward,
        "answer_format": tagged_answer_format_reward(),
    }
    unknown = [name for name in config.functions if name not in available]
    if unknown:
        raise RecipeError(
            f"unknown reward function(s) {unknown} in section 'reward'; choose from {sorted(available)}"
        )
    return [available[name] for name in config.functions]


def build_engine(recipe: Recipe, model, tokenizer, model_path: str):
    """The rollout engine: `hf` wraps the live policy; `vllm` loads the starting checkpoint."""
    from reasoning.rollout import make_engine
    from reasoning.rollout.hf import HFEngine

    config = recipe.rollout
    try:
        if config.engine == "hf":
            return HFEngine(model=model, tokenizer=tokenizer, **config.engine_kwargs)
        kwargs = {"dtype": recipe.model.dtype, **config.engine_kwargs}
        return make_engine(config.engine, model_path, **kwargs)
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

    return VariationalReasoningPipeline(
        recipe.method,
        base_path,
        records,
        training_values(recipe),
        engine_for,
        trace_max_tokens=recipe.rollout.max_tokens,
        console=console,
        dtype=recipe.model.dtype,
    )


def build_trainer(
    recipe: Recipe, model, tokenizer, records, args: TrainingArguments, callbacks: list, model_path: str
):
    """The trainer object for `recipe.trainer`."""
    from reasoning.trainers.grpo import GRPOTrainer
    from reasoning.trainers.sft import make_sft_trainer

    if recipe.trainer == "sft":
        return make_sft_trainer(model, tokenizer, records, args, recipe.method, callbacks=callbacks)
    if recipe.trainer == "latent_thought":
        from reasoning.trainers.latent_thought import make_latent_thought_trainer

        try:
            return make_latent_thought_trainer(model, tokenizer, records, args, recipe.method, callbacks)
        except ValueError as err:
            raise RecipeError(f"trainer 'latent_thought': {err}") from err
    from reasoning.trainers.bayes import BayesTrainer
    from reasoning.trainers.covrl import CoVRLTrainer
    from reasoning.trainers.gflownet import GFlowNetTrainer

    rollout_trainers = {
        "grpo": GRPOTrainer,
        "gflownet": GFlowNetTrainer,
        "covrl": CoVRLTrainer,
        "bayes": BayesTrainer,
    }
    trainer_class = rollout_trainers[recipe.trainer]
    try:
        return trainer_class(
            model=model,
            args=args,
            config=recipe.method,
            train_dataset=records,
            processing_class=tokenizer,
            reward_funcs=reward_functions(recipe.reward),
            reward_weights=recipe.reward.weights,
            engine=build_engine(recipe, model, tokenizer, model_path),
            sampling=build_sampling(recipe, args.seed),
            callbacks=callbacks,
        )
    except ValueError as err:
        raise RecipeError(f"trainer {recipe.trainer!r}: {err}") from err
