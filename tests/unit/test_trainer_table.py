"""The trainer table (`reasoning.recipes.TRAINERS`) and the checks shared by recipes and trainer
constructors (`reasoning.trainers.checks`, `RolloutTrainer.check_sampling`): one function per check,
messages in recipe keys or constructor arguments, a recipe failing before any model is loaded."""

import dataclasses
from pathlib import Path

import pytest
import yaml

import reasoning.recipes.build as recipe_build
from reasoning.recipes import TRAINERS, RecipeError, check_recipe, parse_recipe, run
from reasoning.rollout import Sampling
from reasoning.trainers.base import RolloutTrainer, RolloutTrainerConfig
from reasoning.trainers.bayes import BayesConfig, BayesTrainer
from reasoning.trainers.checks import check_generation_sizes, check_reward_functions
from reasoning.trainers.grpo import GRPOConfig, GRPOTrainer

ROOT = Path(__file__).resolve().parents[2]


def demo(name: str) -> dict:
    raw = yaml.safe_load((ROOT / "recipes" / "demo" / f"{name}.yaml").read_text())
    raw["model"] = {"tiny": "1m"}
    raw.pop("eval", None)
    return raw


def test_the_table_rows_agree_with_the_trainers():
    assert set(TRAINERS) == {p.stem for p in (ROOT / "recipes" / "demo").glob("*.yaml")} - {"bayes_moment"}
    for name, entry in TRAINERS.items():
        assert dataclasses.is_dataclass(entry.config), name
        rollout = issubclass(entry.config, RolloutTrainerConfig)
        assert (entry.rollout_class is not None) == rollout, name
        if rollout:
            assert issubclass(entry.rollout_class, RolloutTrainer), name
    assert [n for n, e in TRAINERS.items() if e.pipeline] == ["variational"]
    assert {n for n, e in TRAINERS.items() if e.eval_steps_problem} == {"variational", "latent_thought"}


def test_generation_sizes_one_function_two_vocabularies():
    assert check_generation_sizes(GRPOConfig(num_generations=4), 8, 2) == (2, 4)  # 16 completions, 4 prompts
    assert check_generation_sizes(GRPOConfig(num_generations=4, steps_per_generation=4), 2, 2) == (4, 2)
    with pytest.raises(ValueError) as constructor:
        check_generation_sizes(GRPOConfig(num_generations=4), 3, 1)
    with pytest.raises(ValueError) as recipe:
        check_generation_sizes(GRPOConfig(num_generations=4), 3, 1, section="grpo")
    assert "per_device_train_batch_size × steps_per_generation = 3 × 1 = 3" in str(constructor.value)
    assert "not divisible by num_generations = 4" in str(constructor.value)
    assert "set per_device_train_batch_size to 4, or num_generations to 3" in str(constructor.value)
    assert "not divisible by grpo.num_generations = 4" in str(recipe.value)
    assert "set training.per_device_train_batch_size to 4, or grpo.num_generations to 3" in str(recipe.value)
    with pytest.raises(ValueError, match=r"^grpo.steps_per_generation \(3\) must be a multiple of training"):
        check_generation_sizes(GRPOConfig(steps_per_generation=3), 8, 2, section="grpo")
    with pytest.raises(ValueError, match="^num_iterations must be at least 1, got 0"):
        check_generation_sizes(GRPOConfig(num_iterations=0), 8, 1)


def test_reward_functions_checked_alike():
    check_reward_functions(["correctness"], [1.0], needs_rewards=True)
    check_reward_functions([], None, needs_rewards=False)
    with pytest.raises(ValueError, match=r"^2 reward weights for 1 reward functions; give one weight"):
        check_reward_functions(["correctness"], [1.0, 2.0], needs_rewards=True)
    with pytest.raises(
        ValueError, match=r"^reward.weights has 2 values for 1 reward.functions \['correctness'\]"
    ):
        check_reward_functions(["correctness"], [1.0, 2.0], needs_rewards=True, section="grpo")
    with pytest.raises(
        ValueError, match="^trainer 'grpo' needs at least one reward function in reward.functions"
    ):
        check_reward_functions([], None, needs_rewards=True, section="grpo")


def test_sampling_warpers_are_the_trainer_classes_rule():
    GRPOTrainer.check_sampling(GRPOConfig(), Sampling(temperature=0.7))  # temperature is scored
    with pytest.raises(ValueError, match="GRPOTrainer scores completions with temperature only"):
        GRPOTrainer.check_sampling(GRPOConfig(), Sampling(top_k=5))
    BayesTrainer.check_sampling(
        BayesConfig(score_with_sampling_warpers=True), Sampling(temperature=0.7, top_k=5)
    )
    with pytest.raises(ValueError, match="score_with_sampling_warpers: true"):
        BayesTrainer.check_sampling(BayesConfig(), Sampling(temperature=0.7))
    with pytest.raises(ValueError, match="greedy"):
        BayesTrainer.check_sampling(BayesConfig(score_with_sampling_warpers=True), Sampling(temperature=0.0))


@pytest.mark.parametrize(
    ("name", "rollout", "message"),
    [
        ("grpo", {"top_k": 5}, r"^trainer 'grpo': GRPOTrainer scores completions with temperature only"),
        (
            "bayes",
            {"temperature": 0.7},
            r"^trainer 'bayes': BayesTrainer: sampling uses warpers.*score_with_sampling",
        ),
        ("covrl", {"top_p": 0.9}, r"^trainer 'covrl': CoVRLTrainer scores completions with temperature only"),
    ],
)
def test_a_recipe_fails_on_the_trainers_own_checks_before_a_model_loads(
    name, rollout, message, monkeypatch, tmp_path
):
    raw = demo(name)
    raw["rollout"] = {**raw.get("rollout", {}), **rollout}
    raw.setdefault("training", {})["output_dir"] = str(tmp_path / "run")
    with pytest.raises(RecipeError, match=message):
        check_recipe(parse_recipe(raw))

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(recipe_build, "load_model_and_tokenizer", no_model)
    with pytest.raises(RecipeError, match=message):
        run(parse_recipe(raw))
    assert not (tmp_path / "run").exists()
