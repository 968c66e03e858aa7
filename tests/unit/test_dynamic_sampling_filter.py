"""DAPO dynamic sampling: the group filter (`objectives.policy.informative_groups`) by enumeration, and
the config's refusals.

The filter is checked against its definition (a group is kept when its non-NaN values are not all
equal) on every 0/1/NaN group of size 3, and against DAPO's condition 0 < accuracy < 1 on every 0/1
group of size 4.
"""

import itertools
import math

import pytest
import torch

from reasoning.objectives.policy import informative_groups
from reasoning.trainers.grpo import GRPOConfig


def test_every_group_of_three_with_nan():
    groups = list(itertools.product([0.0, 1.0, math.nan], repeat=3))
    values = torch.tensor([v for g in groups for v in g])
    expected = [len({v for v in g if not math.isnan(v)}) > 1 for g in groups]
    assert informative_groups(values, 3).tolist() == expected
    assert sum(expected) == 12  # the 6 orderings of (0, 1, NaN) and the 6 of (0, 0, 1) or (1, 1, 0)


def test_equals_dapo_accuracy_condition_on_every_binary_group():
    groups = list(itertools.product([0.0, 1.0], repeat=4))
    values = torch.tensor([v for g in groups for v in g])
    accuracy = values.view(-1, 4).mean(dim=1)
    assert torch.equal(informative_groups(values, 4), (accuracy > 0) & (accuracy < 1))


def test_equal_non_binary_values_never_count_as_spread():
    # the group mean of 0.1 × 3 is not exactly 0.1 in floating point: a std test could see spread
    values = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.70001, -2.5, -2.5, -2.5], dtype=torch.float64)
    assert informative_groups(values, 3).tolist() == [False, True, False]


def test_config_refusals_name_the_fix():
    with pytest.raises(ValueError, match="loss_type rft weights completions by their reward"):
        GRPOConfig(dynamic_sampling=True, loss_type="rft")
    with pytest.raises(ValueError, match="num_generations = 1 gives no group any spread"):
        GRPOConfig(dynamic_sampling=True, num_generations=1)
    with pytest.raises(
        ValueError, match=r"max_generation_batches must be 0 \(no limit\) or at least 1, got -1"
    ):
        GRPOConfig(dynamic_sampling=True, max_generation_batches=-1)
    GRPOConfig(dynamic_sampling=True, loss_type="grpo", num_generations=2, max_generation_batches=0)
