"""Bad recipes: every one a one-paragraph error naming the bad key or value, exit code 2, no traceback,
rejected before a model is built or anything is written.

A seeded generator mutates the demo recipes (typos in keys and sections, wrong types, missing
fields, bad names and values, impossible batch arithmetic, missing paths, bad data files, bad
overrides) into 240 cases run through the CLI in-process (typer's CliRunner: the function the
`reasoning` command runs), plus a few as real subprocesses.
"""

import copy
import dataclasses
import json
import os
import random
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
import yaml
from transformers import TrainingArguments
from typer.testing import CliRunner

import reasoning.recipes as recipes
import reasoning.recipes.build as recipe_build
from reasoning.cli import app
from reasoning.recipes import SECTIONS, TRAINERS, check_recipe, load_recipe, load_training_records
from reasoning.trainers.base import RolloutTrainerConfig

ROOT = Path(__file__).resolve().parents[2]
SMALL_DATA = "synthetic:addition?digits=3&n=64&seed=1&split=train"
# training keys with plain types (others, e.g. lr_scheduler_type: SchedulerType | str, take enums)
TRAINING_TYPES = {
    "max_steps": int,
    "per_device_train_batch_size": int,
    "gradient_accumulation_steps": int,
    "learning_rate": float,
    "weight_decay": float,
    "warmup_steps": float,
    "seed": int,
    "disable_tqdm": bool,
}


def base_recipes() -> dict[str, dict]:
    """The demo recipes made cheap and self-contained: a fresh tiny model, 64 synthetic records."""
    bases = {}
    for path in sorted((ROOT / "recipes" / "demo").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if "path" in raw["model"]:
            raw["model"] = {"tiny": "1m"}
        raw["data"] = {"train": SMALL_DATA}
        raw.get("eval", {}).pop("before", None)
        bases[path.stem] = raw
    return bases


def typo(key: str, rng: random.Random, valid: list[str]) -> str:
    for _ in range(20):
        i = rng.randrange(len(key) - 1)
        kind = rng.choice(["swap", "drop", "double"])
        if kind == "swap":
            new = key[:i] + key[i + 1] + key[i] + key[i + 2 :]
        elif kind == "drop":
            new = key[:i] + key[i + 1 :]
        else:
            new = key[:i] + key[i] + key[i:]
        if new not in valid and new != key:
            return new
    return key + "x"


def wrong_value(annotation, rng: random.Random):
    """A value that does not fit `annotation` (None where it is optional is avoided)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return rng.choice(["sometimes", 3])
    if annotation is int:
        return rng.choice(["many", 2.5, [1]])
    if annotation is float:
        return rng.choice(["fast", [1.0], {"a": 1}])
    if annotation is str:
        return rng.choice([12345, ["a", "b"]])
    if origin is typing.Literal:
        return "not-an-option"
    if annotation is list or origin is list:
        return "a,b"
    if annotation is dict or origin is dict:
        return [1, 2]
    return None


class Case(typing.NamedTuple):
    kind: str
    raw: typing.Any  # a dict (dumped as YAML) or a str (written verbatim)
    overrides: list[str]
    expect: list[str]


def mutations(bases: dict[str, dict], data_dir: Path, count: int, seed: int = 0) -> list[Case]:
    rng = random.Random(seed)
    configs = {name: entry.config for name, entry in TRAINERS.items()}
    empty = data_dir / "empty.jsonl"
    empty.write_text("")
    none_answer = data_dir / "none_answer.jsonl"
    none_answer.write_text(
        json.dumps({"question": "1+1", "answer": "2"})
        + "\n"
        + json.dumps({"question": "2+2", "answer": None})
    )
    list_answer = data_dir / "list_answer.jsonl"
    list_answer.write_text(json.dumps({"question": "1+1", "answer": [2]}) + "\n")
    broken = data_dir / "broken.jsonl"
    broken.write_text('{"question": "1+1", "answer": \n')

    def section_of(raw: dict, name: str) -> dict:
        raw.setdefault(name, {})
        if raw[name] is None:
            raw[name] = {}
        return raw[name]

    def typed_key(raw, trainer):
        section = rng.choice([*SECTIONS, trainer, "training"])
        if section == "training":
            key = rng.choice(sorted(TRAINING_TYPES))
            return section, key, TRAINING_TYPES[key]
        cls = configs[trainer] if section == trainer else SECTIONS[section]
        hints = typing.get_type_hints(cls)
        choices = [k for k, h in hints.items() if wrong_value(h, rng) is not None]
        if section == "model":
            choices = [k for k in choices if k not in ("path", "tiny", "latent_thought", "lora")]
        key = rng.choice(choices)
        return section, key, hints[key]

    cases: list[Case] = []
    while len(cases) < count:
        name = rng.choice(sorted(bases))
        raw = copy.deepcopy(bases[name])
        trainer = raw["trainer"]
        rollout = issubclass(configs[trainer], RolloutTrainerConfig)
        kinds = [
            "key typo",
            "section typo",
            "wrong type",
            "missing",
            "bad name",
            "bad number",
            "bad path",
            "bad data",
            "not a mapping",
            "override",
        ]
        if rollout:
            kinds += ["batch arithmetic"] * 2
        kind = rng.choice(kinds)
        overrides: list[str] = []
        if kind == "key typo":
            section = rng.choice([s for s in raw if isinstance(raw[s], dict) and raw[s] and s != "model"])
            key = rng.choice(sorted(raw[section]))
            cls = TrainingArguments if section == "training" else configs.get(section) or SECTIONS[section]
            bad = typo(key, rng, [f.name for f in dataclasses.fields(cls)])
            raw[section][bad] = raw[section].pop(key)
            expect = [repr(bad), f"section {section!r}"]
        elif kind == "section typo":
            section = rng.choice([s for s in raw if s != "trainer"])
            bad = typo(section, rng, [*SECTIONS, trainer, "training", "trainer"])
            raw[bad] = raw.pop(section)
            expect = [f"unknown section {bad!r}"]
        elif kind == "wrong type":
            section, key, hint = typed_key(raw, trainer)
            value = wrong_value(hint, rng)
            section_of(raw, section)[key] = value
            expect = [f"{section}.{key} must be"]
        elif kind == "missing":
            what = rng.choice(["trainer", "model", "data.train"])
            if what == "trainer":
                del raw["trainer"]
                expect = ["unknown trainer None"]
            elif what == "model":
                del raw["model"]
                expect = ["section 'model' needs 'path'"]
            else:
                raw["data"].pop("train")
                expect = ["section 'data' needs 'train'"]
        elif kind == "bad name":
            options = [
                ("trainer", typo(trainer, rng, list(configs)), ["unknown trainer"]),
                ("reward.functions", [typo("correctness", rng, [])], ["unknown reward function"]),
                ("eval.benchmarks", [typo("addition", rng, [])], ["eval.benchmarks"]),
                ("eval.engine", typo("vllm", rng, ["hf"]), ["eval.engine"]),
                ("model.dtype", "float33", ["model.dtype", "float33"]),
            ]
            if rollout:
                options.append(("rollout.engine", rng.choice(["vlm", "tgi", "hff"]), ["rollout.engine"]))
                options.append((f"{trainer}.reward_failures", "ignore", [f"{trainer}.reward_failures"]))
            if "tiny" in raw["model"]:
                options.append(("model.tiny", rng.choice(["7m", "huge"]), ["model.tiny"]))
            dotted, value, expect = rng.choice(options)
            if dotted == "trainer":
                raw["trainer"] = value
            else:
                section, key = dotted.split(".")
                section_of(raw, section)[key] = value
            expect = [*expect, str(value[0] if isinstance(value, list) else value)]
        elif kind == "bad number":
            options = [
                ("training.per_device_train_batch_size", rng.choice([0, -4])),
                ("training.gradient_accumulation_steps", 0),
                ("training.learning_rate", -0.1),
                ("data.limit", rng.choice([0, -1])),
                ("eval.n", 0),
            ]
            if rollout:
                options += [
                    (f"{trainer}.num_generations", 0),
                    ("rollout.temperature", -1.0),
                    ("rollout.max_tokens", 0),
                ]
                method, training = raw.get(trainer) or {}, raw["training"]
                steps = method.get("steps_per_generation") or training.get("gradient_accumulation_steps", 1)
                prompts = training["per_device_train_batch_size"] * steps // method.get("num_generations", 8)
                if prompts > 1:
                    options.append(("data.limit", 1))  # fewer prompts than one generation needs
            dotted, value = rng.choice(options)
            section, key = dotted.split(".")
            section_of(raw, section)[key] = value
            expect = ["prompts"] if (dotted, value) == ("data.limit", 1) else [key]
        elif kind == "bad path":
            i = rng.randrange(10**6)
            choice = rng.choice(["model", "data", "recipe"])
            if choice == "model":
                raw["model"] = {"path": f"./missing/checkpoint-{i}"}
                expect = ["model.path", f"checkpoint-{i}", "does not exist"]
            elif choice == "data":
                raw["data"]["train"] = f"missing-{i}.jsonl"
                expect = [f"missing-{i}.jsonl", "does not exist"]
            else:
                raw = None  # the recipe file itself is missing
                expect = ["does not exist"]
        elif kind == "bad data":
            choice = rng.choice(["empty", "none", "list", "broken", "synthetic", "column", "mapping key"])
            data = raw["data"]
            if choice == "empty":
                data["train"], expect = str(empty), ["no records"]
            elif choice == "none":
                data["train"], expect = str(none_answer), ["row 1", "answer None"]
            elif choice == "list":
                data["train"], expect = str(list_answer), ["row 0", "answer [2]"]
            elif choice == "broken":
                data["train"], expect = str(broken), ["cannot be read"]
            elif choice == "synthetic":
                data["train"], expect = "synthetic:nosuch?n=3", ["nosuch"]
            elif choice == "column":
                data["columns"], expect = {"question": "problem_text"}, ["'problem_text'", "missing"]
            else:
                data["columns"], expect = {"questio": "q"}, ["'questio'"]
        elif kind == "not a mapping":
            choice = rng.choice(["section", "recipe", "yaml"])
            if choice == "section":
                section = rng.choice([s for s in raw if s != "trainer"])
                raw[section] = rng.choice([[1, 2], "text", 3])
                expect = [repr(section), "mapping"]
            elif choice == "recipe":
                raw, expect = "- trainer: sft\n- model: {}\n", ["YAML mapping"]
            else:
                raw, expect = "trainer: [sft\nmodel: {tiny: 1m}\n", ["not valid YAML"]
        elif kind == "override":
            choice = rng.choice(["type", "typo", "no value", "no dashes", "no section"])
            if choice == "type":
                overrides, expect = ["--training.max_steps", "many"], ["training.max_steps"]
            elif choice == "typo":
                bad = typo("rollout", rng, [])
                overrides, expect = [f"--{bad}.engine", "hf"], [f"unknown section {bad!r}"]
            elif choice == "no value":
                overrides, expect = ["--training.max_steps"], ["no value"]
            elif choice == "no dashes":
                overrides, expect = ["training.max_steps", "3"], ["--section.key"]
            else:
                overrides, expect = ["--max_steps", "3"], ["must name a section and a key"]
        else:  # batch arithmetic
            section = section_of(raw, trainer)
            training = raw["training"]
            batch = training.get("per_device_train_batch_size", 8)
            accumulation = training.get("gradient_accumulation_steps", 1)
            if rng.random() < 0.7:
                steps = section.get("steps_per_generation") or accumulation
                group = rng.choice([g for g in range(3, 40) if (batch * steps) % g])
                section["num_generations"] = group
                expect = [f"{trainer}.num_generations = {group}", "per_device_train_batch_size to"]
            else:
                training["gradient_accumulation_steps"] = 2 * accumulation
                section["steps_per_generation"] = 2 * accumulation + 1
                expect = [f"{trainer}.steps_per_generation", "gradient_accumulation_steps"]
        cases.append(Case(f"{name}: {kind}", raw, overrides, expect))
    return cases


@pytest.fixture(scope="module")
def bases():
    return base_recipes()


def test_the_unmutated_bases_pass(bases):
    """Control: each base recipe passes the checks, so a mutation is what a failure is due to."""
    for name, raw in bases.items():
        recipe = recipes.parse_recipe(copy.deepcopy(raw))
        recipe.training["output_dir"] = "unused"
        args = check_recipe(recipe)
        if recipe.data.train is not None:
            assert len(load_training_records(recipe, args)) > 0, name


def test_mutated_recipes_fail_fast_with_one_paragraph(bases, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a bad recipe passed validation: a model would be built")

    monkeypatch.setattr(recipe_build, "load_model_and_tokenizer", no_model)  # what `run` calls
    runner = CliRunner()
    cases = mutations(bases, tmp_path, count=240)
    kinds = {case.kind.split(": ")[1] for case in cases}
    assert len(cases) >= 200 and len(kinds) >= 11
    failures = []
    for i, case in enumerate(cases):
        path = tmp_path / f"recipe-{i}.yaml"
        run_dir = tmp_path / f"run-{i}"
        if isinstance(case.raw, dict):
            raw = copy.deepcopy(case.raw)
            if isinstance(raw.get("training"), dict):
                raw["training"]["output_dir"] = str(run_dir)
            path.write_text(yaml.safe_dump(raw))
        elif isinstance(case.raw, str):
            path.write_text(case.raw)
        result = runner.invoke(app, ["train", str(path), *case.overrides])
        output = result.output
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        problems = []
        if result.exit_code != 2:
            problems.append(f"exit code {result.exit_code} ({result.exception!r})")
        if "Traceback" in output:
            problems.append("traceback printed")
        if len(errors) != 1:
            problems.append(f"{len(errors)} error lines")
        elif not all(text in errors[0] for text in case.expect):
            problems.append(f"message does not name {case.expect}")
        if run_dir.exists():
            problems.append("the run directory was written")
        if problems:
            failures.append(f"{case.kind}: {problems}: {errors or output[-500:]}")
    assert not failures, "\n".join(failures[:20])


def test_real_command_exit_code_and_message(bases, tmp_path):
    """A few as real subprocesses of `python -m reasoning train` (no traceback, exit 2, one line), run
    side by side: each pays the torch/transformers import."""
    grpo = copy.deepcopy(bases["grpo"])
    grpo["grpo"]["num_generations"] = 7
    typo_key = copy.deepcopy(bases["sft"])
    typo_key["training"]["learnig_rate"] = typo_key["training"].pop("learning_rate")
    cases = [
        (grpo, ["grpo.num_generations = 7", "per_device_train_batch_size to 70"]),
        (typo_key, ["'learnig_rate'", "did you mean 'learning_rate'"]),
    ]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    processes = []
    for i, (raw, _) in enumerate(cases):
        raw["training"]["output_dir"] = str(tmp_path / f"run-{i}")
        path = tmp_path / f"r{i}.yaml"
        path.write_text(yaml.safe_dump(raw))
        command = [sys.executable, "-m", "reasoning", "train", str(path)]
        processes.append(
            subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    for i, (process, (_, expect)) in enumerate(zip(processes, cases)):
        stdout, stderr = process.communicate(timeout=300)
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert process.returncode == 2, stderr[-2000:]
        assert "Traceback" not in stderr + stdout
        assert len(errors) == 1 and all(text in errors[0] for text in expect), stderr[-2000:]
        assert not (tmp_path / f"run-{i}").exists()


def test_existing_run_is_left_alone_when_the_model_cannot_load(bases, tmp_path):
    """A check that needs the model (here: it cannot be loaded) fails before anything is overwritten."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text("previous run\n")
    raw = copy.deepcopy(bases["sft"])
    raw["model"] = {"path": str(tmp_path / "not-a-checkpoint")}
    (tmp_path / "not-a-checkpoint").mkdir()
    raw["training"]["output_dir"] = str(run_dir)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(recipes.RecipeError, match="cannot be loaded"):
        recipes.run(load_recipe(path))
    assert (run_dir / "recipe.yaml").read_text() == "previous run\n"
