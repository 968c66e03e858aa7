"""DAPO's soft overlong punishment (Eq. 13) as a reward function, and its recipe surface.

Values are checked by hand at every boundary of the three cases, against TRL 1.16's own
implementation (`trl.rewards.get_soft_overlong_punishment`, an installed library called as is) on
every length, and through `reward_functions` from a recipe's `reward:` section.
"""

import pickle

import pytest
from trl.rewards import get_soft_overlong_punishment

from reasoning.recipes import RecipeError, check_recipe, parse_recipe, reward_functions
from reasoning.recipes.schema import RewardConfig
from reasoning.rewards.length import SoftOverlongPunishment, soft_overlong_penalty
from reasoning.rewards.verifier import correctness


def ids(length: int) -> list[int]:
    return [7] * length


@pytest.mark.parametrize(
    "length, expected",
    [
        (0, 0.0),
        (5, 0.0),
        (6, 0.0),  # |y| = L_max − L_cache = 6: still no penalty
        (7, -0.25),  # (6 − 7) / 4
        (8, -0.5),
        (9, -0.75),
        (10, -1.0),  # |y| = L_max: the ramp reaches −1 (a completion cut at max_tokens)
        (11, -1.0),  # beyond L_max
        (50, -1.0),
    ],
)
def test_values_by_hand_at_the_boundaries(length, expected):
    reward = SoftOverlongPunishment(max_completion_len=10, soft_punish_cache=4)
    assert reward(completion_ids=[ids(length)]) == [expected]
    assert soft_overlong_penalty(length, 10, 4) == expected


def test_degenerate_caches():
    hard = SoftOverlongPunishment(max_completion_len=10, soft_punish_cache=0)  # a step at L_max
    assert hard(completion_ids=[ids(10), ids(11)]) == [0.0, -1.0]
    whole = SoftOverlongPunishment(max_completion_len=4, soft_punish_cache=4)  # the ramp starts at 0
    assert whole(completion_ids=[ids(n) for n in range(6)]) == [0.0, -0.25, -0.5, -0.75, -1.0, -1.0]


@pytest.mark.parametrize("max_len, cache", [(10, 4), (16, 0), (16, 16), (100, 20), (7, 3)])
def test_equals_trl_on_every_length(max_len, cache):
    ours = SoftOverlongPunishment(max_len, cache)
    theirs = get_soft_overlong_punishment(max_completion_len=max_len, soft_punish_cache=cache)
    batch = [ids(n) for n in range(max_len + 3)]
    assert ours(completion_ids=batch, prompts=[], completions=[]) == theirs(completion_ids=batch)


def test_bad_parameters_are_refused_with_the_valid_range():
    with pytest.raises(
        ValueError, match=r"soft_punish_cache \(L_cache\) must be in \[0, max_completion_len=10\], got 11"
    ):
        SoftOverlongPunishment(10, 11)
    with pytest.raises(
        ValueError, match=r"soft_punish_cache \(L_cache\) must be in \[0, max_completion_len=10\], got -1"
    ):
        SoftOverlongPunishment(10, -1)
    with pytest.raises(ValueError, match=r"max_completion_len \(L_max\) must be at least 1, got 0"):
        SoftOverlongPunishment(0, 0)


def test_pickles_and_logs_under_its_recipe_name():
    reward = pickle.loads(pickle.dumps(SoftOverlongPunishment(10, 4)))
    assert reward.__name__ == "soft_overlong_punishment"
    assert reward(completion_ids=[ids(8)]) == [-0.5]


def test_recipe_builds_it_beside_correctness_with_rollout_max_tokens_as_default():
    config = RewardConfig(functions=["correctness", "soft_overlong_punishment"], soft_punish_cache=8)
    first, second = reward_functions(config, max_tokens=40)
    assert first is correctness
    assert (second.max_completion_len, second.soft_punish_cache) == (40, 8)
    explicit = RewardConfig(
        functions=["soft_overlong_punishment"], soft_punish_cache=8, max_completion_len=30
    )
    (third,) = reward_functions(explicit, max_tokens=40)
    assert third(completion_ids=[ids(22), ids(26), ids(30), ids(40)]) == [0.0, -0.5, -1.0, -1.0]


def grpo_recipe(**reward):
    return parse_recipe(
        {
            "trainer": "grpo",
            "model": {"tiny": "1m"},
            "data": {"train": "synthetic:addition?digits=3&n=64&seed=1&split=train"},
            "rollout": {"max_tokens": 40},
            "reward": reward,
            "grpo": {"num_generations": 4},
            "training": {"per_device_train_batch_size": 8, "report_to": "none"},
        }
    )


def test_recipe_errors_name_the_key():
    check_recipe(grpo_recipe(functions=["correctness", "soft_overlong_punishment"], soft_punish_cache=8))
    with pytest.raises(
        RecipeError,
        match=r"soft_overlong_punishment needs reward.soft_punish_cache \(L_cache, e.g. a fifth of rollout.max_tokens = 8",
    ):
        check_recipe(grpo_recipe(functions=["correctness", "soft_overlong_punishment"]))
    with pytest.raises(
        RecipeError,
        match="reward.soft_punish_cache is a parameter of soft_overlong_punishment, which reward.functions",
    ):
        check_recipe(grpo_recipe(functions=["correctness"], soft_punish_cache=8))
    with pytest.raises(
        RecipeError,
        match=r"section 'reward': soft_punish_cache \(L_cache\) must be in \[0, max_completion_len=40\], got 64",
    ):
        check_recipe(grpo_recipe(functions=["soft_overlong_punishment"], soft_punish_cache=64))
    with pytest.raises(RecipeError, match="choose from .*'soft_overlong_punishment'"):
        check_recipe(grpo_recipe(functions=["soft_overlong"]))
