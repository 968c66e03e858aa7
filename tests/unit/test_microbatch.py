"""Token-budget micro-batch planning: coverage, budgets, optimality against brute force, slicing."""

import itertools
import random

import pytest
import torch

from reasoning.trainers.microbatch import (
    MicroBatch,
    check_token_budget,
    merge_rows,
    plan_microbatches,
    plan_step,
    slice_rows,
)


def contiguous_splits(n: int):
    """Every way to cut the rows 0..n-1 into consecutive runs."""
    for cuts in itertools.product([False, True], repeat=n - 1):
        runs, current = [], [0]
        for i, cut in enumerate(cuts, start=1):
            if cut:
                runs.append(current)
                current = []
            current.append(i)
        runs.append(current)
        yield runs


def covered_once(plan: list[MicroBatch], n: int) -> bool:
    flat = [i for m in plan for i in m.indices]
    return sorted(flat) == list(range(n))


@pytest.mark.parametrize("seed", range(6))
def test_budget_plan_covers_every_row_once_fits_the_budget_and_is_deterministic(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 30))]
    budget = rng.randint(60, 300)
    plan = plan_microbatches(lengths, budget)
    assert covered_once(plan, len(lengths))
    assert plan == plan_microbatches(list(lengths), budget)  # same input, same plan
    for m in plan:
        assert m.cost == len(m.indices) * m.width <= budget
        assert m.width == max(lengths[i] for i in m.indices)
        assert m.tokens == sum(lengths[i] for i in m.indices)
        assert [lengths[i] for i in m.indices] == sorted((lengths[i] for i in m.indices), reverse=True)
    # longest first across micro-batches too
    assert [m.width for m in plan] == sorted((m.width for m in plan), reverse=True)


@pytest.mark.parametrize("seed", range(8))
def test_budget_plan_uses_the_fewest_micro_batches_of_any_split_of_the_sorted_rows(seed):
    rng = random.Random(100 + seed)
    lengths = [rng.randint(1, 40) for _ in range(rng.randint(2, 11))]
    budget = rng.randint(40, 160)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    fewest = min(
        len(runs)
        for runs in contiguous_splits(len(order))
        if all(len(r) * max(lengths[order[k]] for k in r) <= budget for r in runs)
    )
    assert len(plan_microbatches(lengths, budget)) == fewest


@pytest.mark.parametrize("seed", range(8))
def test_fixed_count_plan_has_exactly_that_many_and_the_smallest_possible_largest_cost(seed):
    rng = random.Random(200 + seed)
    lengths = [rng.randint(1, 50) for _ in range(rng.randint(2, 10))]
    parts = rng.randint(1, len(lengths))
    plan = plan_microbatches(lengths, num_microbatches=parts)
    assert len(plan) == parts and covered_once(plan, len(lengths))
    assert all(m.indices for m in plan)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    best = min(
        max(len(r) * max(lengths[order[k]] for k in r) for r in runs)
        for runs in contiguous_splits(len(order))
        if len(runs) == parts
    )
    assert max(m.cost for m in plan) == best


def test_prompt_lengths_make_the_width_longest_prompt_plus_longest_completion():
    # totals 10 (prompt 8 + 2) and 9 (prompt 1 + 8): left/right padded they need 8 + 8 = 16 columns
    plan = plan_microbatches([10, 9], 40, prompt_lengths=[8, 1])
    (only,) = plan
    assert only.width == 16 and only.cost == 32 and only.tokens == 19
    # with a budget of 30 they no longer fit together
    assert [m.indices for m in plan_microbatches([10, 9], 30, prompt_lengths=[8, 1])] == [(0,), (1,)]


def test_packed_plan_fills_rows_first_fit_decreasing_without_padding():
    lengths = [7, 3, 5, 2, 6, 4]
    plan = plan_microbatches(lengths, 10, packed=True)
    assert covered_once(plan, len(lengths))
    assert all(m.packed and m.cost == m.width == m.tokens == sum(lengths[i] for i in m.indices) <= 10 for m in plan)
    # FFD: 7+3, 6+4, 5+2 -> three full-ish rows; padded with the same budget needs more micro-batches
    assert [sorted(lengths[i] for i in m.indices) for m in plan] == [[3, 7], [4, 6], [2, 5]]
    assert len(plan_microbatches(lengths, 10)) > len(plan)


def test_max_sequences_caps_rows_per_micro_batch():
    plan = plan_microbatches([1] * 10, 1000, max_sequences=3)
    assert [len(m.indices) for m in plan] == [3, 3, 3, 1]
    assert all(len(m.indices) <= 2 for m in plan_microbatches([1] * 5, 100, packed=True, max_sequences=2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lengths=[5, 20], max_tokens_per_microbatch=10), "sequence 1 has 20 tokens, more than"),
        (dict(lengths=[5, 0], max_tokens_per_microbatch=10), r"lengths\[1\] = 0"),
        (dict(lengths=[5]), "exactly one of"),
        (dict(lengths=[5], max_tokens_per_microbatch=10, num_microbatches=1), "exactly one of"),
        (dict(lengths=[5, 6], num_microbatches=3), "between 1 and the 2 rows"),
        (dict(lengths=[5, 6], max_tokens_per_microbatch=20, prompt_lengths=[1]), "1 prompt_lengths for 2"),
        (dict(lengths=[5, 6], max_tokens_per_microbatch=20, prompt_lengths=[1, 7]), r"prompt_lengths\[1\] = 7"),
        (dict(lengths=[5, 6], max_tokens_per_microbatch=20, max_sequences=0), "max_sequences must be >= 1"),
        (dict(lengths=[5, 6], num_microbatches=1, packed=True), "use max_tokens_per_microbatch to pack"),
    ],
)
def test_bad_plans_are_refused_with_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_microbatches(**kwargs)


def test_empty_batch_plans_nothing():
    assert plan_microbatches([], 10) == []


def test_slice_rows_takes_the_rows_and_cuts_columns_that_are_padding_in_all_of_them():
    prompt_ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 4], [0, 0, 0, 3]])
    prompt_mask = (prompt_ids != 0).long()
    completion_ids = torch.tensor([[1, 2, 0, 0, 0], [3, 4, 5, 6, 7], [8, 0, 0, 0, 0]])
    completion_mask = (completion_ids != 0).long()
    batch = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "old_logprobs": -completion_ids.double(),
        "advantages": torch.tensor([0.5, -1.0, 2.0]),
        "generation_tokens": torch.tensor(8.0),
        "note": "kept",
    }
    part = slice_rows(batch, [2, 0])
    assert part["prompt_ids"].tolist() == [[0, 3], [5, 6]]
    assert part["prompt_mask"].tolist() == [[0, 1], [1, 1]]
    assert part["completion_ids"].tolist() == [[8, 0], [1, 2]]
    assert part["completion_mask"].tolist() == [[1, 0], [1, 1]]
    assert part["old_logprobs"].tolist() == [[-8.0, 0.0], [-1.0, -2.0]]
    assert part["advantages"].tolist() == [2.0, 0.5]
    assert part["generation_tokens"] is batch["generation_tokens"] and part["note"] == "kept"
    whole = slice_rows(batch, [0, 1, 2])
    assert all(torch.equal(whole[k], batch[k]) for k in ("prompt_ids", "completion_ids", "old_logprobs"))


def test_merge_rows_puts_each_micro_batch_output_back_in_batch_order():
    completion_ids = torch.tensor([[1, 2, 0, 0], [3, 4, 5, 6], [7, 0, 0, 0], [8, 9, 1, 0]])
    batch = {"completion_ids": completion_ids, "completion_mask": (completion_ids != 0).long()}
    plan = plan_microbatches([2, 4, 1, 3], 6)
    parts = [slice_rows(batch, m.indices)["completion_ids"].double() for m in plan]
    assert {p.shape[1] for p in parts} != {4}  # some parts were trimmed
    assert torch.equal(merge_rows(parts, plan, rows=4, width=4), completion_ids.double())
    with pytest.raises(ValueError, match="2 outputs for"):
        merge_rows(parts[:2], plan, rows=4, width=4)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_step_plan_fills_exactly_the_micro_steps_with_budget_chunks_covering_every_row(seed, packed):
    rng = random.Random(300 + seed)
    n = rng.randint(1, 24)
    lengths = [rng.randint(2, 50) for _ in range(n)]
    prompts = [rng.randint(1, length - 1) for length in lengths]
    budget = rng.randint(100, 400)
    micro_steps = rng.randint(1, min(n, 6))
    steps = plan_step(lengths, budget, micro_steps, prompt_lengths=prompts, packed=packed)
    assert len(steps) == micro_steps and all(steps)  # every micro-step has at least one chunk
    counts = [len(chunks) for chunks in steps]
    assert max(counts) - min(counts) <= 1
    chunks = [c for chunks in steps for c in chunks]
    assert covered_once(chunks, n)
    for c in chunks:
        assert c.cost <= budget and c.packed is packed
        assert c.tokens == sum(lengths[i] for i in c.indices)
        if not packed:  # longest prompt + longest completion, as left/right padding lays them out
            assert c.width == max(prompts[i] for i in c.indices) + max(lengths[i] - prompts[i] for i in c.indices)
    fewest = len(plan_microbatches(lengths, budget, prompt_lengths=prompts, packed=packed))
    assert len(chunks) == max(fewest, micro_steps)  # chunks are split only to fill the micro-steps
    assert steps == plan_step(lengths, budget, micro_steps, prompt_lengths=prompts, packed=packed)


def test_step_plan_needs_a_row_per_micro_step():
    with pytest.raises(ValueError, match="3 rows cannot fill 4 micro-steps"):
        plan_step([5, 6, 7], 100, 4)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((10, "auto", 8, 16), "set it to at least 24"),
        ((None, True, 8, 16), "set max_tokens_per_microbatch too"),
        ((100, "yes", 8, 16), "padding_free must be true, false or 'auto'"),
        ((100.5, False, 8, 16), "must be an integer or None"),
    ],
)
def test_token_budget_settings_are_refused_with_what_to_change(args, message):
    with pytest.raises(ValueError, match=message):
        check_token_budget(*args)


def test_token_budget_settings_that_fit_pass():
    check_token_budget(24, "auto", 8, 16)
    check_token_budget(None, "auto", 8, 16)
    check_token_budget(None, False, 8, 16)
