"""One-step-off rollouts, the parts without a trainer: the launch schedule, reading the sampler ahead,
the prefetch's request matching, errors and checkpoint state (on a real `hf` engine of a tiny model)."""

import logging

import pytest

from reasoning.models.tiny import build_tiny_model
from reasoning.rollout import Sampling
from reasoning.rollout.hf import HFEngine
from reasoning.trainers.async_rollouts import Request, RolloutPrefetch, generates_in_background, launch_offset
from reasoning.trainers.base import GroupBatchSampler, RolloutTrainer
from reasoning.trainers.covrl import CoVRLConfig, CoVRLTrainer
from reasoning.trainers.grpo import GRPOConfig, GRPOTrainer


def launches(accumulation: int, cycle: int, max_staleness: int, cycles: int = 3) -> list[tuple[int, int]]:
    """(micro-step, optimizer steps ahead) of every launch over `cycles` generation cycles."""
    found = []
    for micro in range(cycles * cycle):
        offset = launch_offset(micro, accumulation, cycle, max_staleness)
        if offset is not None:
            found.append((micro, offset))
    return found


def test_the_next_cycle_starts_once_per_cycle_at_most_max_staleness_steps_ahead():
    # one optimizer step per cycle (the default): at every step start, one step ahead
    assert launches(1, 1, 1) == [(0, 1), (1, 1), (2, 1)]
    assert launches(2, 2, 1) == [(0, 1), (2, 1), (4, 1)]  # accumulation 2: the steps' first micro-steps
    # 4 optimizer steps per cycle (steps_per_generation 2 × num_iterations 2, accumulation 1)
    assert launches(1, 4, 1) == [(3, 1), (7, 1), (11, 1)]  # at the start of each cycle's last step
    assert launches(1, 4, 3) == [(1, 3), (5, 3), (9, 3)]
    assert launches(1, 4, 9) == [(0, 4), (4, 4), (8, 4)]  # capped at one cycle: at its start
    assert launches(2, 4, 1) == [(2, 1), (6, 1), (10, 1)]
    assert launches(1, 1, 0) == [] and launches(2, 4, 0) == []  # synchronous


@pytest.mark.parametrize("rank,world", [(0, 1), (0, 2), (1, 2)])
def test_the_sampler_reads_any_cycle_ahead_as_it_will_yield_it(rank, world):
    sampler = GroupBatchSampler(num_prompts=23, prompts_per_rank=3, repeats=2, seed=7, rank=rank, world_size=world)
    for epoch in (0, 1, 2):
        sampler.set_epoch(epoch)
        yielded = list(sampler)[:: sampler.repeats]
        assert len(yielded) == sampler.cycles_per_epoch == 23 // (3 * world)
        assert yielded == [sampler.cycle_indices(c, epoch) for c in range(sampler.cycles_per_epoch)]
    sampler.set_epoch(0)
    ahead = sampler.cycle_indices(0, 1)  # the next epoch's first cycle, read during epoch 0
    sampler.set_epoch(1)
    assert next(iter(sampler)) == ahead


def request(prompts, seeds=(11, 12), cycle=1):
    return Request(cycle, 0, [list(p) for p in prompts], Sampling(max_tokens=6, seed=3), 2, list(seeds))


@pytest.fixture(scope="module")
def engine():
    model, tokenizer = build_tiny_model("1m", seed=0)
    return HFEngine(model=model, tokenizer=tokenizer)


def test_hf_generates_inline_and_a_prefetch_serves_only_its_own_call(engine, caplog):
    assert not generates_in_background(engine)  # the hf engine seeds torch's global generator
    prefetch = RolloutPrefetch(engine)
    prompts = [[5, 6, 7], [8, 9]]
    ahead = request(prompts)
    prefetch.start(ahead)
    assert prefetch.pending is ahead
    with pytest.raises(RuntimeError, match="already ahead"):
        prefetch.start(request(prompts, cycle=2))
    done, _ = prefetch.take(prompts, ahead.sampling, 2, [11, 12])
    direct = engine.generate(prompts, ahead.sampling, n=2, seeds=[11, 12])
    assert [[r.completion_ids for r in g] for g in done.groups] == [[r.completion_ids for r in g] for g in direct]
    assert prefetch.pending is None and prefetch.take(prompts, ahead.sampling, 2, [11, 12]) == (None, 0.0)

    prefetch.start(request(prompts))
    with caplog.at_level(logging.WARNING, logger="reasoning.trainers.async_rollouts"):
        other, _ = prefetch.take(prompts, ahead.sampling, 2, [11, 13])  # another seed: not this call's
    assert other is None and prefetch.pending is None and "dropped" in caplog.text


def test_an_engine_error_in_the_prefetch_is_raised_where_it_is_taken(engine):
    for background in (False, True):
        prefetch = RolloutPrefetch(engine, background=background)
        bad = Request(1, 0, [[5, 6]], Sampling(max_tokens=4, seed=1), 2, [1, 2])  # two seeds, one prompt
        prefetch.start(bad)
        with pytest.raises(ValueError, match="give one seed per prompt"):
            prefetch.take(bad.prompt_ids, bad.sampling, 2, [1, 2])
        prefetch.close()


def test_a_pending_generation_survives_a_checkpoint(engine, tmp_path):
    from reasoning.trainers.checkpoint import load_state_file, save_state_file

    prompts = [[5, 6, 7], [8, 9]]
    prefetch = RolloutPrefetch(engine)
    ahead = Request(3, 5, prompts, Sampling(max_tokens=6, seed=3, stop=("\n",)), 2, [11, 12])
    prefetch.start(ahead)
    save_state_file({"prefetch": prefetch.state_dict()}, tmp_path / "state.pt")  # plain containers only
    restored = RolloutPrefetch(engine)
    restored.load_state_dict(load_state_file(tmp_path / "state.pt")["prefetch"])
    assert restored.pending == ahead
    done, _ = restored.take(prompts, ahead.sampling, 2, [11, 12])
    original, _ = prefetch.take(prompts, ahead.sampling, 2, [11, 12])
    assert done.groups == original.groups and done.request.version == 5
    empty = RolloutPrefetch(engine)
    assert empty.state_dict() is None
    empty.load_state_dict(None)
    assert empty.pending is None


def test_only_trainers_that_correct_stale_rollouts_take_max_staleness():
    sampling = Sampling(temperature=1.0)
    GRPOTrainer.check_sampling(GRPOConfig(max_staleness=1), sampling)
    with pytest.raises(ValueError, match="CoVRLTrainer has no off-policy correction"):
        CoVRLTrainer.check_sampling(CoVRLConfig(max_staleness=1), sampling)
    with pytest.raises(ValueError, match="max_staleness must be >= 0"):
        GRPOTrainer.check_sampling(GRPOConfig(max_staleness=-1), sampling)
    with pytest.raises(ValueError, match="is_truncation must be > 0"):
        GRPOTrainer.check_sampling(GRPOConfig(max_staleness=1, is_truncation=0.0), sampling)
    with pytest.raises(ValueError, match="leave tis_cap null"):
        GRPOConfig(max_staleness=1, tis_cap=2.0)
    assert not RolloutTrainer.corrects_stale_rollouts and GRPOTrainer.corrects_stale_rollouts
