"""CoVRL objectives against exact enumeration of the toy sequence space (27 sequences of length 3).

The prior p and posterior q are two toy policies (`random_logits`). The composite p′ is the
per-token mixture: an autoregressive policy whose conditional at every prefix is ½ p(·|prefix) +
½ q(·|prefix); as a sequence distribution p′(z) = Π_t p′(z_t|z_<t), which differs from the
sequence-level mixture ½ p(z) + ½ q(z) that hybrid sampling draws from.
"""

import math

import pytest
import torch
from toy import NUM_PREFIXES, SEQUENCES, VOCAB, prefix_index, random_logits, sample, token_logprobs

from reasoning.objectives.covrl import (
    behaviour_logprobs,
    composite_clipped_surrogate,
    composite_kl,
    composite_logprobs,
    hybrid_group_logprob,
    hybrid_logprob,
    kl_posterior_sampled,
    kl_prior_sampled,
    nll_selection,
    sample_sources,
    selective_nll,
)

N_SEQ = SEQUENCES.shape[0]


def composite_table(prior, posterior):
    """Per-prefix log-conditionals of p′ as a logits table: log(½ softmax(a) + ½ softmax(b))."""
    return torch.log(0.5 * torch.softmax(prior, -1) + 0.5 * torch.softmax(posterior, -1))


def passes(prior, posterior, sequences=SEQUENCES):
    """The two teacher-forced passes: ℓp, ℓq [N, T] and the composite ℓ′ [N, T]."""
    lp, lq = token_logprobs(prior, sequences), token_logprobs(posterior, sequences)
    return lp, lq, composite_logprobs(lp, lq)


def exact_sequence_kl(prior, posterior):
    """KL(p′ ‖ p) over the 27 sequences, p′ the autoregressive per-token mixture."""
    log_comp = token_logprobs(composite_table(prior, posterior), SEQUENCES).sum(-1)
    log_prior = token_logprobs(prior, SEQUENCES).sum(-1)
    return (log_comp.exp() * (log_comp - log_prior)).sum()


def exact_token_target(prior, posterior, sampler_seq_probs):
    """Σ_z s(z) Σ_t KL(p′(·|z_<t) ‖ p(·|z_<t)): the per-token KL along the sampler's prefixes."""
    log_comp, log_prior = composite_table(prior, posterior), torch.log_softmax(prior, -1)
    kl_per_prefix = (log_comp.exp() * (log_comp - log_prior)).sum(-1)  # [num_prefixes]
    per_sequence = kl_per_prefix[prefix_index(SEQUENCES)].sum(-1)  # [27]
    return (sampler_seq_probs * per_sequence).sum()


def seq_index(sequences):
    """Row of each sequence in SEQUENCES (lexicographic order)."""
    index = torch.zeros(sequences.shape[0], dtype=torch.long)
    for t in range(sequences.shape[1]):
        index = index * VOCAB + sequences[:, t]
    return index


def hybrid_sampler(prior, posterior, alpha, n, seed):
    """Test sampler: each rollout picks the prior w.p. α, then a whole sequence from that source."""
    from_prior = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < alpha
    draws = torch.where(from_prior.unsqueeze(-1), sample(prior, n, seed + 1), sample(posterior, n, seed + 2))
    return draws, from_prior


def test_composite_is_the_normalised_per_token_mixture():
    prior, posterior = random_logits(0), random_logits(1)
    lp, lq, lc = passes(prior, posterior)
    assert torch.allclose(lc, torch.logsumexp(torch.stack([lp, lq]), 0) - math.log(2))
    assert torch.allclose(lc, token_logprobs(composite_table(prior, posterior), SEQUENCES), atol=1e-6)
    # an autoregressive policy: normalised over the 27 sequences
    assert lc.sum(-1).exp().sum() == pytest.approx(1.0, abs=1e-6)
    # ... but not the sequence-level mixture ½ p(z) + ½ q(z)
    sequence_mixture = 0.5 * lp.sum(-1).exp() + 0.5 * lq.sum(-1).exp()
    assert (lc.sum(-1).exp() - sequence_mixture).abs().max() > 1e-3
    # prior_weight generalises ½
    weighted = composite_logprobs(lp, lq, prior_weight=0.2)
    assert torch.allclose(weighted.exp(), 0.2 * lp.exp() + 0.8 * lq.exp())
    assert torch.equal(composite_logprobs(lp, lq, prior_weight=1.0), lp)


@pytest.mark.parametrize("source", ["prior", "posterior"])
@pytest.mark.parametrize("weighting", ["token", "sequence"])
def test_composite_kl_expectation_by_enumeration(source, weighting):
    prior, posterior = random_logits(2), random_logits(3, scale=1.5)
    lp, lq, lc = passes(prior, posterior)
    sampler_logp = lp if source == "prior" else lq
    sampler_probs = sampler_logp.sum(-1).exp()
    estimate = composite_kl(lc, lp, sampler_logp, weighting=weighting).sum(-1)
    expectation = (sampler_probs * estimate).sum()
    if weighting == "sequence":
        target = exact_sequence_kl(prior, posterior)
    else:
        target = exact_token_target(prior, posterior, sampler_probs)
    assert expectation == pytest.approx(target.item(), rel=1e-5)
    # the two targets differ on this toy: the token weighting is not the sequence-level KL
    token_target = exact_token_target(prior, posterior, sampler_probs)
    assert abs(token_target - exact_sequence_kl(prior, posterior)) > 1e-3


def test_composite_kl_estimators_are_non_negative_and_match_the_methods_formulas():
    for seed in range(5):
        prior, posterior = random_logits(10 + seed, scale=4.0), random_logits(20 + seed, scale=4.0)
        lp, lq, lc = passes(prior, posterior)
        for weighting in ("token", "sequence"):
            for sampler in (lp, lq):
                assert (composite_kl(lc, lp, sampler, weighting=weighting) >= 0).all()
        rho = (lc - lp).exp()
        assert torch.allclose(composite_kl(lc, lp, lp), rho * torch.log(rho) - rho + 1, atol=1e-6)
        assert torch.allclose(kl_prior_sampled(lc, lp), rho * torch.log(rho) - rho + 1, atol=1e-6)
        w = (lc - lq).exp()
        expected = w * (torch.log(rho) + 1 / rho - 1)
        assert torch.allclose(composite_kl(lc, lp, lq), expected, atol=1e-6)
        assert torch.allclose(kl_posterior_sampled(lc, lp, lq), expected, atol=1e-6)


@pytest.mark.parametrize("weighting", ["token", "sequence"])
def test_composite_kl_is_unbiased_under_hybrid_sampling(weighting):
    prior, posterior, alpha = random_logits(4), random_logits(5), 0.4
    samples, from_prior = hybrid_sampler(prior, posterior, alpha, 40000, seed=7)
    lp, lq, lc = passes(prior, posterior, samples)
    per_sequence = composite_kl(lc, lp, behaviour_logprobs(lp, lq, from_prior), weighting=weighting).sum(-1)
    mean, se = per_sequence.mean(), per_sequence.std() / len(per_sequence) ** 0.5
    if weighting == "sequence":
        target = exact_sequence_kl(prior, posterior)
    else:
        prior_probs = token_logprobs(prior, SEQUENCES).sum(-1).exp()
        post_probs = token_logprobs(posterior, SEQUENCES).sum(-1).exp()
        target = alpha * exact_token_target(prior, posterior, prior_probs) + (1 - alpha) * exact_token_target(
            prior, posterior, post_probs
        )
    assert abs(mean - target) < 4 * se
    assert se < 0.05 * target  # the check has power


def test_composite_kl_gradient_is_the_exact_kl_gradient():
    prior = random_logits(6).requires_grad_(True)
    posterior = random_logits(7).requires_grad_(True)
    lp, lq, lc = passes(prior, posterior)
    sampler_probs = lq.sum(-1).exp().detach()  # posterior-sampled traces; the sampler is the old policy
    # the sampler's log-probs come from the same graph; composite_kl detaches them itself
    estimate = composite_kl(lc, lp, lq, weighting="sequence").sum(-1)
    got = torch.autograd.grad((sampler_probs * estimate).sum(), (prior, posterior))
    want = torch.autograd.grad(exact_sequence_kl(prior, posterior), (prior, posterior))
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5)
        assert w.abs().max() > 1e-2


def test_composite_kl_ignores_padding():
    lc = torch.tensor([[-1.0, -0.5, float("-inf")]], requires_grad=True)
    lp = torch.tensor([[-1.2, -0.4, float("-inf")]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    for weighting in ("token", "sequence"):
        out = composite_kl(lc, lp, lp, mask=mask, weighting=weighting)
        assert out[0, 2] == 0 and torch.isfinite(out).all()
        (grad,) = torch.autograd.grad(out.sum(), lc)
        assert torch.isfinite(grad).all() and grad[0, 2] == 0


def _chi_square(counts, probs):
    expected = probs * counts.sum()
    return ((counts - expected) ** 2 / expected).sum()


def test_hybrid_per_rollout_probability_is_the_sampling_frequency():
    prior, posterior, alpha, n = random_logits(8), random_logits(9), 0.3, 100000
    samples, _ = hybrid_sampler(prior, posterior, alpha, n, seed=11)
    counts = torch.bincount(seq_index(samples), minlength=N_SEQ).double()
    lp, lq, lc = passes(prior, posterior)
    probs = hybrid_logprob(lp.sum(-1), lq.sum(-1), alpha).exp().double()
    assert probs.sum() == pytest.approx(1.0, abs=1e-6)
    # 26 degrees of freedom: mean 26, sd 7.2
    assert _chi_square(counts, probs) < 70
    # the per-token composite is a different distribution, and the frequency test sees it
    assert _chi_square(counts, lc.sum(-1).exp().double()) > 500
    # α = 1 and α = 0 are the sources themselves
    assert torch.equal(hybrid_logprob(lp.sum(-1), lq.sum(-1), 1.0), lp.sum(-1))
    assert torch.equal(hybrid_logprob(lp.sum(-1), lq.sum(-1), 0.0), lq.sum(-1))


def test_hybrid_per_group_probability_is_the_sampling_frequency():
    prior, posterior, alpha, groups, size = random_logits(12), random_logits(13), 0.6, 200000, 2
    generator = torch.Generator().manual_seed(14)
    from_prior = (torch.rand(groups, generator=generator) < alpha).repeat_interleave(size)
    draws = torch.where(
        from_prior.unsqueeze(-1), sample(prior, groups * size, 15), sample(posterior, groups * size, 16)
    )
    pairs = seq_index(draws).view(groups, size)
    counts = torch.bincount(pairs[:, 0] * N_SEQ + pairs[:, 1], minlength=N_SEQ**2).double()
    lp, lq = token_logprobs(prior, SEQUENCES).sum(-1), token_logprobs(posterior, SEQUENCES).sum(-1)
    i, j = torch.meshgrid(torch.arange(N_SEQ), torch.arange(N_SEQ), indexing="ij")
    probs = (
        hybrid_group_logprob(torch.stack([lp[i], lp[j]], -1), torch.stack([lq[i], lq[j]], -1), alpha)
        .exp()
        .double()
        .reshape(-1)
    )
    assert probs.sum() == pytest.approx(1.0, abs=1e-6)
    frequency = counts / groups
    sd = (probs * (1 - probs) / groups).sqrt()
    assert ((frequency - probs).abs() <= 5 * sd + 1e-9).all()
    # independent per-rollout sources would give the product of marginals: rejected
    marginal = hybrid_logprob(lp, lq, alpha).exp().double()
    product = (marginal[:, None] * marginal[None, :]).reshape(-1)
    assert ((frequency - product).abs() > 5 * (product * (1 - product) / groups).sqrt()).any()


def test_sample_sources():
    generator = torch.Generator().manual_seed(0)
    per_rollout = sample_sources(5000, 4, alpha=0.3, level="rollout", generator=generator)
    per_group = sample_sources(5000, 4, alpha=0.3, level="group", generator=generator)
    for sources in (per_rollout, per_group):
        assert sources.shape == (20000,) and sources.dtype == torch.bool
        assert abs(sources.float().mean() - 0.3) < 0.02
    grouped = per_group.view(5000, 4)
    assert (grouped == grouped[:, :1]).all()
    assert not (per_rollout.view(5000, 4) == per_rollout.view(5000, 4)[:, :1]).all()
    with pytest.raises(ValueError):
        sample_sources(2, 2, level="token")


def test_behaviour_logprobs_pick_the_sampling_source():
    lp, lq = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]]), torch.tensor([[-5.0, -6.0], [-7.0, -8.0]])
    out = behaviour_logprobs(lp, lq, torch.tensor([True, False]))
    assert torch.equal(out, torch.tensor([[-1.0, -2.0], [-7.0, -8.0]]))


def rewards_of(sequences):
    return (sequences == 1).sum(-1).float() + 0.5 * (sequences[:, 0] == 2).float()


def test_composite_surrogate_gradient_at_ratio_one_is_the_exact_policy_gradient():
    prior = random_logits(17).requires_grad_(True)
    posterior = random_logits(18).requires_grad_(True)
    lp, lq, lc = passes(prior, posterior)
    advantage = rewards_of(SEQUENCES) - 1.0
    probs = lc.sum(-1).exp()
    exact = torch.autograd.grad((probs * advantage).sum(), (prior, posterior), retain_graph=True)
    from_prior = torch.arange(N_SEQ) % 2 == 0  # irrelevant for the composite ratio
    per_token, stats = composite_clipped_surrogate(
        lc, lp.detach(), lq.detach(), from_prior, advantage, ratio_to="composite"
    )
    assert stats["region"] == 0  # ratio exactly 1: nothing clipped
    got = torch.autograd.grad((probs.detach() * per_token.sum(-1)).sum(), (prior, posterior))
    for g, e in zip(got, exact):
        assert torch.allclose(g, -e, atol=1e-6)
        assert e.abs().max() > 1e-2
    # Monte Carlo, sampling the composite policy itself: unbiased within a few standard errors
    table = composite_table(prior.detach(), posterior.detach())
    estimates = []
    for seed in range(10):
        samples = sample(table, 2000, seed=200 + seed)
        lp_s, lq_s, lc_s = passes(prior, posterior, samples)
        per_token, _ = composite_clipped_surrogate(
            lc_s,
            lp_s.detach(),
            lq_s.detach(),
            from_prior[:1].expand(2000),
            rewards_of(samples) - 1.0,
            ratio_to="composite",
        )
        (grad,) = torch.autograd.grad(per_token.sum(-1).mean(), prior)
        estimates.append(grad)
    estimates = torch.stack(estimates)
    mean, se = estimates.mean(0), estimates.std(0) / len(estimates) ** 0.5
    assert ((mean + exact[0]).abs() <= 4 * se + 1e-4).all()


def test_composite_surrogate_behaviour_ratio():
    # ratio to the old sampling source: p′/p for prior rows, p′/q for posterior rows, clipped at ε = 0.3
    lp = torch.log(torch.tensor([[0.5, 0.2], [0.5, 0.2]]))
    lq = torch.log(torch.tensor([[0.1, 0.6], [0.1, 0.6]]))
    lc = composite_logprobs(lp, lq)  # p′ = [0.3, 0.4]
    loss, _ = composite_clipped_surrogate(lc, lp, lq, torch.tensor([True, False]), torch.tensor([1.0, 1.0]))
    # row 0 ratios 0.6, 2.0 -> min(ρ, clip(ρ)) = 0.6, 1.3; row 1 ratios 3.0, 0.667 -> 1.3, 0.667
    assert torch.allclose(loss, -torch.tensor([[0.6, 1.3], [1.3, 0.4 / 0.6]]), atol=1e-6)
    # when the posterior equals the prior, the behaviour ratio is 1 and the gradient is the policy gradient
    theta = random_logits(19).requires_grad_(True)
    lp_t = token_logprobs(theta, SEQUENCES)
    lc_t = composite_logprobs(lp_t, lp_t)
    advantage = rewards_of(SEQUENCES) - 1.0
    probs = lp_t.sum(-1).exp()
    (exact,) = torch.autograd.grad((probs * advantage).sum(), theta, retain_graph=True)
    per_token, _ = composite_clipped_surrogate(
        lc_t, lp_t.detach(), lp_t.detach(), torch.arange(N_SEQ) % 3 == 0, advantage
    )
    (got,) = torch.autograd.grad((probs.detach() * per_token.sum(-1)).sum(), theta)
    assert torch.allclose(got, -exact, atol=1e-6)
    with pytest.raises(ValueError):
        composite_clipped_surrogate(lc, lp, lq, torch.tensor([True, False]), torch.ones(2), ratio_to="old")


def test_selective_nll_by_hand():
    from_prior = torch.tensor([True, True, False, True])
    well_formed = torch.tensor([True, False, True, True])
    advantages = torch.tensor([0.5, 1.0, 2.0, -0.1])
    selected = nll_selection(from_prior, well_formed, advantages)
    assert selected.tolist() == [True, False, False, False]
    logp = torch.tensor([[-1.0, -3.0], [-9.0, -9.0], [-9.0, -9.0], [float("-inf"), -1.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    assert selective_nll(logp, mask, selected, coef=1.0) == pytest.approx(2.0 / 4)
    assert selective_nll(logp, mask, selected) == pytest.approx(0.1 * 2.0 / 4)


# ---------------------------------------------------------------------- VeriFree / LaTRO reduction
ANSWER = torch.tensor([1, 0])  # y*, two tokens
MARKER = 2  # the answer marker: a trace ends at its first 2; a sequence without one is truncated


def toy_traces():
    """Cut every toy sequence with the trainer's cutter: policy mask [27, 3], truncated [27], trace codes."""
    from reasoning.data.templates import cut_trace

    cuts = [
        cut_trace(seq.tolist(), [MARKER], set(), truncated=MARKER not in seq.tolist(), at="first") for seq in SEQUENCES
    ]
    policy = torch.tensor([[t < c.policy_length for t in range(SEQUENCES.shape[1])] for c in cuts]).float()
    trace_only = torch.tensor([[t < len(c.trace) for t in range(SEQUENCES.shape[1])] for c in cuts]).float()
    truncated = torch.tensor([c.truncated for c in cuts])
    # the decoder conditions on the trace: its index in the prefix table (same layout as toy.prefix_index);
    # truncated sequences have no trace to score (their reward is fixed), any index will do
    codes = torch.tensor(
        [0 if c.truncated else prefix_index(torch.tensor([c.trace + [0]]))[0, -1].item() for c in cuts]
    )
    return policy, trace_only, truncated, codes


def decoder_logprobs(decoder, codes):
    """log p(y*_t | x, z) [27, 2] from a per-trace logits table `decoder` [num_prefixes, 2, VOCAB]."""
    return torch.log_softmax(decoder[codes], dim=-1).gather(-1, ANSWER.expand(len(codes), 2).unsqueeze(-1))[
        ..., 0
    ]


def expected_loss(policy_logits, decoder, codes, reduction, policy_mask, reward, answer_coef, baseline=0.0):
    """E_z[trainer loss] by enumeration: the batch reduction applied to rows weighted by B·π(z)."""
    from reasoning.objectives.policy import aggregate_loss, clipped_surrogate
    from reasoning.rewards.likelihood import verifree_answer_nll

    lp = token_logprobs(policy_logits, SEQUENCES)
    # B · π(sequence): every sampled sequence is a row; the reductions are linear in rows
    weight = N_SEQ * lp.sum(-1).exp().detach()
    advantage = reward - baseline
    per_token, _ = clipped_surrogate(lp, lp.detach(), advantage, eps_low=0.3, mask=policy_mask)
    loss = aggregate_loss(per_token * weight.unsqueeze(1), policy_mask, reduction)
    answer = decoder_logprobs(decoder, codes)
    return loss + answer_coef * verifree_answer_nll(answer, torch.ones_like(answer), reward * weight)


@pytest.mark.parametrize("method", ["verifree", "latro"])
def test_sum_reduction_gives_the_exact_gradient_of_the_objective(method):
    """VeriFree: ∇E_z[p(y*|x,z)] = E[p ∇log π(z)] + E[p ∇log p(y*|x,z)], z = trace + marker; LaTRO: ∇E[R] =
    E[R ∇log π(z)]. The trainer's default reduction for these methods (sum over the trace, then mean)
    makes the expected loss gradient −∇ of the objective exactly; the per-token mean does not, nor does
    a policy term that leaves out the answer marker."""
    from reasoning.rewards.likelihood import latro_reward, verifree_reward
    from reasoning.trainers.covrl import AGGREGATION, CoVRLConfig

    config = CoVRLConfig(reward=method)
    assert config.loss_type == "sum" and config.baseline == "rloo"
    policy_mask, trace_only, truncated, codes = toy_traces()
    assert truncated.sum() == 8 and (policy_mask.sum(-1) > trace_only.sum(-1))[~truncated].all()
    policy_logits = random_logits(40).requires_grad_(True)
    decoder = torch.randn(NUM_PREFIXES, 2, VOCAB, generator=torch.Generator().manual_seed(41))
    decoder.requires_grad_(True)
    answer = decoder_logprobs(decoder, codes)
    ones = torch.ones_like(answer)
    lp = token_logprobs(policy_logits, SEQUENCES)
    log_pi = (lp * policy_mask).sum(-1)  # log π(trace + marker), or of the whole truncated sequence
    sequence_probs = lp.sum(-1).exp()  # the objective is an expectation over sampled sequences
    if method == "verifree":  # R = p(y*|x,z) from the old policy; truncated (and markerless): 0, kept
        reward = verifree_reward(answer.detach(), ones, truncated=truncated, missing=truncated)
        objective = (sequence_probs * torch.where(truncated, 0.0, answer.sum(-1).exp())).sum()
        answer_coef = config.answer_nll_coef
    else:  # LaTRO: log p(y*|x,z) − β log(π/π₀), the reference π₀ frozen; truncated samples excluded (Â = 0)
        reference = (token_logprobs(random_logits(42), SEQUENCES) * policy_mask).sum(-1)
        reward = latro_reward(answer.detach(), ones, log_pi.detach(), reference, 0.05, truncated=truncated)
        objective = (sequence_probs * torch.nan_to_num(reward, nan=0.0)).sum()
        answer_coef = config.answer_nll_coef  # 0: the released trainer's sft_penalty
        reward = torch.nan_to_num(reward, nan=0.0)
    params = (policy_logits, decoder) if answer_coef else (policy_logits,)
    want = torch.autograd.grad(objective, params)
    reduction = AGGREGATION[config.loss_type]
    for baseline in (0.0, 0.3):  # a constant baseline leaves the expectation unchanged
        if method == "latro" and baseline:
            break  # excluded samples (Â = 0) do not take the baseline: the identity holds without one
        loss = expected_loss(
            policy_logits, decoder, codes, reduction, policy_mask, reward, answer_coef, baseline
        )
        got = torch.autograd.grad(loss, params)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, -w, atol=1e-6, rtol=1e-5)
            assert w.abs().max() > 5e-3
    # the per-token mean (the old default, `loss_type: grpo`) weakens the REINFORCE term by 1/|z|
    loss = expected_loss(policy_logits, decoder, codes, "grpo", policy_mask, reward, answer_coef)
    (got,) = torch.autograd.grad(loss, policy_logits)
    assert (got + want[0]).abs().max() > 0.2 * want[0].abs().max()
    # leaving the marker out of the policy term breaks it too
    loss = expected_loss(policy_logits, decoder, codes, reduction, trace_only, reward, answer_coef)
    (got,) = torch.autograd.grad(loss, policy_logits)
    assert (got + want[0]).abs().max() > 0.2 * want[0].abs().max()
