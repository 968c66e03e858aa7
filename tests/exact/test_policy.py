"""GRPO-family objectives against exact enumeration of a toy sequence space."""

import itertools

import pytest
import torch
from toy import SEQUENCES, random_logits, sample, token_logprobs

from reasoning.objectives.policy import (
    aggregate_loss,
    clipped_surrogate,
    debiased_accuracy_weights,
    debiased_format_rewards,
    group_advantages,
    kl_estimate,
    rloo_advantages,
    truncated_importance_weights,
    weighted_nll,
)


def exact_kl(policy, reference):
    logp = token_logprobs(policy, SEQUENCES).sum(-1)
    ref = token_logprobs(reference, SEQUENCES).sum(-1)
    return (logp.exp() * (logp - ref)).sum()


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_kl_estimators_are_unbiased_for_the_sequence_kl(kind):
    policy, reference = random_logits(0), random_logits(1)
    samples = sample(policy, 40000, seed=2)
    per_sequence = kl_estimate(token_logprobs(policy, samples), token_logprobs(reference, samples), kind).sum(
        -1
    )
    mean, se = per_sequence.mean(), per_sequence.std() / len(per_sequence) ** 0.5
    assert abs(mean - exact_kl(policy, reference)) < 4 * se


def test_k3_is_non_negative_and_k2_mean_matches_enumeration():
    policy, reference = random_logits(3), random_logits(4)
    logp, ref = token_logprobs(policy, SEQUENCES), token_logprobs(reference, SEQUENCES)
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    exact_k2 = (logp.sum(-1).exp() * (0.5 * (logp - ref) ** 2).sum(-1)).sum()
    samples = sample(policy, 40000, seed=5)
    k2 = kl_estimate(token_logprobs(policy, samples), token_logprobs(reference, samples), "k2").sum(-1)
    assert abs(k2.mean() - exact_k2) < 4 * k2.std() / len(k2) ** 0.5


def rewards_of(sequences):
    return (sequences == 1).sum(-1).float() + 0.5 * (sequences[:, 0] == 2).float()


def test_surrogate_gradient_at_ratio_one_is_the_exact_policy_gradient():
    logits = random_logits(6).requires_grad_(True)
    advantage = rewards_of(SEQUENCES) - 1.0
    probs = token_logprobs(logits, SEQUENCES).sum(-1).exp()
    (exact,) = torch.autograd.grad((probs * advantage).sum(), logits)
    # expectation of the surrogate written with exact probabilities: deterministic equality
    logp = token_logprobs(logits, SEQUENCES)
    per_token, _ = clipped_surrogate(logp, logp.detach(), advantage)
    (weighted,) = torch.autograd.grad((probs.detach() * per_token.sum(-1)).sum(), logits)
    assert torch.allclose(weighted, -exact, atol=1e-6)
    # Monte Carlo: unbiased within a few standard errors (20 independent batches)
    estimates = []
    for seed in range(20):
        samples = sample(logits.detach(), 2000, seed=100 + seed)
        logp = token_logprobs(logits, samples)
        per_token, _ = clipped_surrogate(logp, logp.detach(), rewards_of(samples) - 1.0)
        (grad,) = torch.autograd.grad(per_token.sum(-1).mean(), logits)
        estimates.append(grad)
    estimates = torch.stack(estimates)
    mean, se = estimates.mean(0), estimates.std(0) / len(estimates) ** 0.5
    assert ((mean + exact).abs() <= 4 * se + 1e-4).all()


def test_clip_statistics_on_hand_made_cases():
    logp = torch.log(torch.tensor([[1.5, 1.0], [0.5, 1.0], [1.5, 0.5]]))
    old = torch.zeros(3, 2)
    advantages = torch.tensor([1.0, -1.0, -1.0])
    loss, stats = clipped_surrogate(logp, old, advantages, eps_low=0.2, eps_high=0.3)
    # row 0: ratio 1.5 > 1.3 with A>0 clipped high; row 1: 0.5 < 0.8 with A<0 clipped low
    assert torch.allclose(loss[0], torch.tensor([-1.3, -1.0]))
    assert torch.allclose(loss[1], torch.tensor([0.8, 1.0]))
    # row 2, A<0: min(ρA, clip(ρ)A) picks the larger ratio: unclipped 1.5 (pessimistic), 0.8 for 0.5
    assert torch.allclose(loss[2], torch.tensor([1.5, 0.8]))
    assert stats["high"] == pytest.approx(1 / 6) and stats["low"] == pytest.approx(2 / 6)
    assert stats["region"] == pytest.approx(3 / 6)


def test_sequence_level_ratio_is_geometric_mean():
    logp = torch.tensor([[0.2, 0.4, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, _ = clipped_surrogate(
        logp, torch.zeros(1, 3), torch.tensor([1.0]), 10.0, importance_level="sequence", mask=mask
    )
    assert torch.allclose(loss[0, :2], -torch.exp(torch.tensor(0.3)).expand(2))


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    centred = torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    assert torch.allclose(group_advantages(rewards, 4, "none"), centred)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()
    assert torch.allclose(group_advantages(rewards, 4, "group")[:4], centred[:4] / (std + 1e-4))
    assert torch.allclose(group_advantages(rewards, 4, "group")[4:], torch.zeros(4))
    assert torch.allclose(group_advantages(rewards, 4, "batch"), centred / (rewards.std() + 1e-4))


def test_rloo_identity():
    rewards = torch.tensor([3.0, 1.0, 0.0, 2.0, 5.0, 5.0])
    adv = rloo_advantages(rewards, 3)
    assert torch.allclose(adv.view(2, 3).sum(1), torch.zeros(2), atol=1e-6)
    assert torch.allclose(adv, 3 / 2 * group_advantages(rewards, 3, "none"))


def test_aggregations_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate_loss(loss, mask, "grpo") == pytest.approx((2.0 + 4.0) / 2)
    assert aggregate_loss(loss, mask, "token_mean") == pytest.approx(10 / 4)
    assert aggregate_loss(loss, mask, "dapo", normalizer=20.0) == pytest.approx(0.5)
    assert aggregate_loss(loss, mask, "dr_grpo", max_completion_length=5) == pytest.approx(10 / 10)
    with pytest.raises(ValueError):
        aggregate_loss(loss, mask, "nope")


def test_debiased_weights_remove_the_accuracy_dependence():
    group = 4
    for pattern in itertools.product([0, 1], repeat=group):
        correct = torch.tensor(pattern, dtype=torch.float)
        weights = debiased_accuracy_weights(correct, group)
        if correct.sum() == 0:
            assert (weights == 0).all()
        else:
            # every solvable question carries the same total weight, whatever its accuracy
            assert (weights * correct).mean() == pytest.approx(1.0)
            assert (weights[correct == 0] == 0).all()


def test_debiased_format_rewards():
    correct = torch.tensor([1.0, 0.0, 0.0, 0.0])
    formatted = torch.tensor([1.0, 1.0, 0.0, 0.0])
    out = debiased_format_rewards(correct, formatted, 4, alpha=1.0, beta=0.2, gamma=0.0)
    assert torch.allclose(out, torch.tensor([0.8 * 4 + 0.2 * 2, 0.2 * 2, 0.0, 0.0]))


def test_truncated_and_masked_importance_weights():
    trainer = torch.log(torch.tensor([[1.0, 3.0, 1.0]]))
    engine = torch.zeros(1, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert torch.allclose(
        truncated_importance_weights(trainer, engine, cap=2.0, mask=mask), torch.tensor([[1.0, 2.0, 1.0]])
    )
    assert torch.allclose(
        truncated_importance_weights(trainer, engine, cap=2.0, mask=mask, masked=True),
        torch.tensor([[1.0, 0.0, 1.0]]),
    )


def test_weighted_nll():
    logp = torch.tensor([[-1.0, -3.0], [-2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert weighted_nll(logp, mask, torch.tensor([1.0, 0.5])) == pytest.approx((2.0 + 0.5 * 2.0) / 2)
