"""Reference-answer likelihood rewards against direct computations and exact enumeration."""

import math

import pytest
import torch
from toy import SEQUENCES, random_logits, token_logprobs

from reasoning.data.templates import ChatTemplate, PlainTemplate, answer_layout, cut_trace, encode
from reasoning.models.tiny import build_char_tokenizer
from reasoning.rewards.likelihood import (
    RLPRStdFilter,
    answer_logprob,
    apply_missing_answer,
    apply_truncation,
    group_reward_std,
    jensen_bound,
    latro_reward,
    mean_token_probability,
    nover_log_perplexity,
    nover_rank,
    nover_reward,
    rlpr_reward,
    rlpr_std_filter,
    verifree_answer_nll,
    verifree_reward,
)

NEG_INF = float("-inf")

# three answers of lengths 2, 3 and 1; padding holds junk, even −inf
LOGP = torch.tensor([[-0.5, -1.0, NEG_INF], [-0.1, -0.2, -0.3], [-2.0, 7.0, NEG_INF]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
SUMS = torch.tensor([-1.5, -0.6, -2.0])
LENGTHS = torch.tensor([2.0, 3.0, 1.0])


def test_answer_logprob_sum_and_mean():
    assert torch.allclose(answer_logprob(LOGP, MASK), SUMS)
    assert torch.allclose(answer_logprob(LOGP, MASK, "mean"), SUMS / LENGTHS)
    with pytest.raises(ValueError):
        answer_logprob(LOGP, MASK, "max")


def test_mean_token_probability():
    expected = torch.tensor(
        [
            (math.exp(-0.5) + math.exp(-1.0)) / 2,
            (math.exp(-0.1) + math.exp(-0.2) + math.exp(-0.3)) / 3,
            math.exp(-2.0),
        ]
    )
    assert torch.allclose(mean_token_probability(LOGP, MASK), expected)


def test_verifree_reward_and_weighted_answer_nll():
    rewards = verifree_reward(LOGP, MASK)
    assert torch.allclose(rewards, SUMS.exp())
    assert ((rewards > 0) & (rewards <= 1)).all()
    logp = LOGP.clone().requires_grad_(True)
    weights = verifree_reward(logp, MASK)  # carries gradient: the loss must detach it
    loss = verifree_answer_nll(logp, MASK, weights)
    assert loss.item() == pytest.approx(-(SUMS.exp() * SUMS).sum().item() / 3, rel=1e-6)
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.allclose(grad, -SUMS.exp().unsqueeze(1) * MASK / 3)
    # ∇p(y*|z) = p ∇log p: the NLL gradient is minus the reward's gradient, per sample
    (direct,) = torch.autograd.grad(verifree_reward(logp, MASK).sum() / 3, logp)
    assert torch.allclose(grad, -direct)
    # not-applicable rewards weigh nothing
    nan_weights = torch.tensor([math.nan, 0.5, NEG_INF])
    assert verifree_answer_nll(LOGP, MASK, nan_weights).item() == pytest.approx(-0.5 * -0.6 / 3)


def test_rlpr_debias_and_clipping():
    logp = torch.log(torch.tensor([[0.9, 0.7], [0.2, 0.4], [0.6, 0.6], [0.5, 0.1]]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    mean_prob = torch.tensor([0.8, 0.3, 0.6, 0.5])
    no_trace = torch.tensor([0.5, 0.5, 0.1, 0.5])
    assert torch.allclose(rlpr_reward(logp, mask, clip_range=None), mean_prob)
    assert torch.allclose(rlpr_reward(logp, mask, no_trace, clip_range=None), mean_prob - no_trace)
    # default clip to [0, 1]: the negative debiased reward becomes 0
    assert torch.allclose(rlpr_reward(logp, mask, no_trace), torch.tensor([0.3, 0.0, 0.5, 0.0]))
    # configurable range
    assert torch.allclose(
        rlpr_reward(logp, mask, no_trace, clip_range=(-0.1, 0.4)), torch.tensor([0.3, -0.1, 0.4, 0.0])
    )
    # a probability reward that the debiasing pushes above 1 is clipped at 1
    assert rlpr_reward(logp[:1], mask[:1], torch.tensor([-0.5])).item() == pytest.approx(1.0)


def test_rlpr_format_term():
    logp = torch.log(torch.tensor([[0.9, 0.7], [0.2, 0.4]]))
    mask = torch.ones(2, 2)
    format_ok = torch.tensor([True, False])
    reward = rlpr_reward(logp, mask, torch.tensor([0.5, 0.1]), format_ok=format_ok)
    assert torch.allclose(reward, torch.tensor([0.9 * 0.3 + 0.1, 0.9 * 0.2]))
    assert torch.allclose(
        rlpr_reward(logp, mask, format_ok=format_ok, format_coef=0.0), torch.tensor([0.8, 0.3])
    )


def test_rlpr_std_filter_keeps_std_at_or_above_the_bound():
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.0, 1.0, 0.0, 1.0, 0.2, 0.3, math.nan, math.nan])
    std = group_reward_std(rewards, 4)
    assert std[0] == pytest.approx(0.0, abs=1e-7)
    assert std[1] == pytest.approx(torch.tensor([0.0, 1.0, 0.0, 1.0]).std().item())
    assert std[2] == pytest.approx(torch.tensor([0.2, 0.3]).std().item())  # NaN entries left out
    keep = rlpr_std_filter(rewards, 4, bound=0.05)
    assert keep.tolist() == [False] * 4 + [True] * 4 + [True] * 4
    keep = rlpr_std_filter(rewards, 4, bound=0.1)
    assert keep.tolist() == [False] * 4 + [True] * 4 + [False] * 4
    # at the bound: kept (std >= bound)
    assert rlpr_std_filter(rewards, 4, bound=std[2].item())[8:].all()
    assert rlpr_std_filter(rewards, 4, bound=None).tolist() == [True] * 12  # not started: all kept
    one_valid = torch.tensor([0.4, math.nan])
    assert math.isnan(group_reward_std(one_valid, 2)[0]) and not rlpr_std_filter(one_valid, 2, 0.0).any()


def test_rlpr_std_filter_schedule_by_hand():
    schedule = RLPRStdFilter(beta=0.5, momentum=0.9, ema_start=2, filter_start=4)
    stds = {1: [9.0], 2: [0.1, 0.3], 3: [0.5, math.nan], 4: [1.0, math.inf], 5: [math.nan], 6: [0.2]}
    bounds = {}
    for step in range(1, 7):
        bounds[step] = schedule.begin_step()
        schedule.record(torch.tensor(stds[step]))
    assert [bounds[s] for s in (1, 2, 3)] == [None, None, None]  # no filtering before filter_start
    ema4 = (0.2 + 0.5) / 2  # mean of the warm-up steps 2 and 3 (step 1 is before ema_start)
    assert bounds[4] == pytest.approx(0.5 * ema4)
    ema5 = 0.9 * ema4 + 0.1 * 1.0  # step 4's mean std (inf left out)
    assert bounds[5] == pytest.approx(0.5 * ema5)
    assert bounds[6] == pytest.approx(0.5 * ema5)  # step 5 had no finite std: no update
    restored = RLPRStdFilter(beta=0.5, momentum=0.9, ema_start=2, filter_start=4)
    restored.load_state_dict(schedule.state_dict())
    assert restored.begin_step() == pytest.approx(schedule.begin_step())
    with pytest.raises(ValueError, match="ema_start < filter_start"):
        RLPRStdFilter(ema_start=5, filter_start=5)


def exact_expected_bound(log_prior, log_lik, group_size):
    """E over z_1..G iid from the prior of the Jensen bound, by listing every G-tuple of traces."""
    n = log_prior.shape[0]
    codes = torch.arange(n**group_size)
    digits = torch.stack([(codes // n**k) % n for k in range(group_size)], dim=-1)  # [n^G, G]
    weights = log_prior[digits].sum(-1).exp()
    bounds = jensen_bound(log_lik[digits])
    return (weights * bounds).sum(), bounds


def test_jensen_bound_is_below_log_evidence_and_tightens_with_group_size():
    log_prior = token_logprobs(random_logits(0), SEQUENCES).sum(-1).double()  # 27 listable traces
    log_lik = torch.log(torch.rand(27, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    log_evidence = torch.logsumexp(log_prior + log_lik, 0)
    expected = {g: exact_expected_bound(log_prior, log_lik, g) for g in (1, 2, 4)}
    assert expected[1][0] == pytest.approx((log_prior.exp() * log_lik).sum().item())  # the ELBO
    assert expected[1][0] < expected[2][0] < expected[4][0] < log_evidence
    assert log_evidence - expected[4][0] < 0.5 * (log_evidence - expected[1][0])
    # a single draw may exceed log p(y*|x): the bound holds in expectation
    assert expected[4][1].max() > log_evidence
    assert jensen_bound(torch.tensor([[-1.0, -3.0]])).item() == pytest.approx(
        math.log((math.exp(-1.0) + math.exp(-3.0)) / 2)
    )


def test_jensen_bound_truncation_options():
    log_lik = torch.tensor([[-1.0, -2.0], [-1.0, -2.0]])
    truncated = torch.tensor([[False, True], [True, True]])
    none = jensen_bound(log_lik, truncated, "none")
    assert none[0].item() == pytest.approx(-1.0) and math.isnan(none[1])
    minus_inf = jensen_bound(log_lik, truncated, "-inf")
    assert minus_inf[0].item() == pytest.approx(-1.0 - math.log(2)) and minus_inf[1] == NEG_INF
    fixed = jensen_bound(log_lik, truncated, -5.0)
    assert fixed[0].item() == pytest.approx(math.log((math.exp(-1.0) + math.exp(-5.0)) / 2))
    assert fixed[1].item() == pytest.approx(-5.0)


def test_nover_rank_by_hand():
    # group 1: mean log-probs −1, −0.25, −2, −0.5 -> best is row 1; group 2 has a tie (rows 4, 5)
    logp = torch.tensor([[-1.0], [-0.25], [-2.0], [-0.5], [-1.0], [-1.0], [-3.0], [-0.1]])
    mask = torch.ones(8, 1)
    reward = nover_reward(logp, mask, group_size=4)
    # (n − r)/n by position r in the stable sort: the worst gets 1/n; the earlier of a tie ranks higher
    assert torch.allclose(reward, torch.tensor([0.5, 1.0, 0.25, 0.75, 0.75, 0.5, 0.25, 1.0]))
    assert torch.allclose(nover_log_perplexity(logp, mask), -logp[:, 0])
    # the length normaliser N(|z|) = max(1, 1 + log10 |z|) divides the log-perplexity
    lengths = torch.tensor([1.0, 100.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    normalised = nover_log_perplexity(logp, mask, lengths)
    assert normalised[1].item() == pytest.approx(0.25 / 3)
    assert normalised[0].item() == pytest.approx(1.0)
    natural = nover_log_perplexity(logp, mask, lengths, log_base=math.e)
    assert natural[1].item() == pytest.approx(0.25 / (1 + math.log(100)))
    # format-invalid completions get 0 and the n of (n − r)/n counts the valid ones only
    valid = torch.tensor([True, False, True, True, False, False, False, False])
    assert torch.allclose(
        nover_reward(logp, mask, 4, format_ok=valid), torch.tensor([2 / 3, 0, 1 / 3, 1.0, 0, 0, 0, 0])
    )


def test_nover_rank_invariances():
    generator = torch.Generator().manual_seed(3)
    logp = -torch.rand(12, 5, generator=generator) * 3
    mask = (torch.rand(12, 5, generator=generator) < 0.8).float()
    mask[:, 0] = 1
    reward = nover_reward(logp, mask, group_size=4)
    assert torch.allclose(
        reward.view(3, 4).sort(dim=1).values, torch.tensor([0.25, 0.5, 0.75, 1.0]).expand(3, 4)
    )
    # strictly increasing transforms of the per-trace log-perplexity leave the reward unchanged:
    # scaling every token log-prob (perplexity -> perplexity^c) or shifting them by a constant
    assert torch.equal(nover_reward(3.0 * logp, mask, 4), reward)
    assert torch.equal(nover_reward(logp - 0.7, mask, 4), reward)
    # and so does a monotone map applied to the log-perplexities themselves
    log_ppl = nover_log_perplexity(logp, mask)
    assert torch.equal(nover_rank(torch.exp(5 * log_ppl) - 2, 4), reward)
    # permutation equivariance within a group (no ties here); groups are independent
    perm = torch.tensor([3, 0, 2, 1, 4, 5, 6, 7, 8, 9, 10, 11])
    assert torch.equal(nover_reward(logp[perm], mask[perm], 4), reward[perm])
    changed = logp.clone()
    changed[4:8] = changed[4:8].flip(0)
    assert torch.equal(nover_reward(changed, mask, 4)[:4], reward[:4])
    assert not torch.equal(nover_reward(changed, mask, 4)[4:8], reward[4:8])
    # all tied: ranks follow the row order
    assert torch.allclose(nover_rank(torch.ones(4), 4), torch.tensor([1.0, 0.75, 0.5, 0.25]))


def test_nover_truncated_traces_are_left_out_of_the_ranking():
    logp = torch.tensor([[-1.0], [-0.5], [-0.1], [-2.0]])
    mask = torch.ones(4, 1)
    truncated = torch.tensor([False, False, True, False])
    expected_valid = torch.tensor([2 / 3, 1.0, 1 / 3])  # rows 0, 1, 3 ranked among themselves
    for option, value in (("none", math.nan), ("-inf", NEG_INF), (0.25, 0.25), (0.0, 0.0), ("score", 0.0)):
        reward = nover_reward(logp, mask, 4, truncated=truncated, truncated_reward=option)
        assert torch.allclose(reward[[0, 1, 3]], expected_valid)
        assert math.isnan(reward[2]) if math.isnan(value) else reward[2].item() == value
    assert nover_reward(logp, mask, 4, truncated=truncated)[2].item() == 0.0  # default: 0, in the group
    alone = nover_reward(logp, mask, 4, truncated=torch.tensor([True, True, False, True]))
    assert alone.tolist() == [0.0, 0.0, 1.0, 0.0]


def test_latro_reward_by_hand():
    trace_logp = torch.tensor([-10.0, -4.0, -6.0])
    reference = torch.tensor([-12.0, -4.0, -5.0])
    reward = latro_reward(LOGP, MASK, trace_logp, reference, beta=0.1)
    assert torch.allclose(reward, SUMS - 0.1 * torch.tensor([2.0, 0.0, -1.0]))
    assert torch.allclose(latro_reward(LOGP, MASK, trace_logp, reference, beta=0.0), SUMS)


PER_SAMPLE_REWARDS = {
    "logprob_sum": lambda **kw: answer_logprob(LOGP, MASK, "sum", **kw),
    "logprob_mean": lambda **kw: answer_logprob(LOGP, MASK, "mean", **kw),
    "verifree": lambda **kw: verifree_reward(LOGP, MASK, **kw),
    "rlpr": lambda **kw: rlpr_reward(LOGP, MASK, torch.full((3,), 0.1), **kw),
    "latro": lambda **kw: latro_reward(LOGP, MASK, torch.zeros(3), torch.ones(3), **kw),
}


@pytest.mark.parametrize("name", sorted(PER_SAMPLE_REWARDS))
@pytest.mark.parametrize("option", ["none", "-inf", -1.0, 2, "score"])
def test_truncated_handling_for_each_reward(name, option):
    reward_fn = PER_SAMPLE_REWARDS[name]
    truncated = torch.tensor([False, True, False])
    plain = reward_fn()
    out = reward_fn(truncated=truncated, truncated_reward=option)
    assert torch.equal(out[[0, 2]], plain[[0, 2]])
    if option == "none":
        assert math.isnan(out[1])
    elif option == "-inf":
        assert out[1] == NEG_INF
    elif option == "score":
        assert out[1] == plain[1]
    else:
        assert out[1].item() == float(option)
    assert not math.isnan(plain[1]) and (option == "score" or plain[1] != out[1])


@pytest.mark.parametrize("bad", ["nan", "inf", True, None])
def test_truncated_reward_option_is_validated(bad):
    with pytest.raises(ValueError, match="truncated_reward"):
        apply_truncation(torch.zeros(2), torch.tensor([True, False]), bad)


PROBABILITY_REWARDS = {
    "verifree": lambda **kw: verifree_reward(LOGP, MASK, **kw),
    "rlpr": lambda **kw: rlpr_reward(
        LOGP, MASK, torch.full((3,), 0.1), format_ok=torch.ones(3, dtype=torch.bool), **kw
    ),
    "nover": lambda **kw: nover_reward(LOGP, MASK, 3, **kw),
}
LOG_REWARDS = {
    "logprob_sum": lambda **kw: answer_logprob(LOGP, MASK, "sum", **kw),
    "latro": lambda **kw: latro_reward(LOGP, MASK, torch.zeros(3), torch.ones(3), **kw),
}


@pytest.mark.parametrize("name", sorted(PROBABILITY_REWARDS) + sorted(LOG_REWARDS))
def test_missing_answer_rule_is_the_same_for_every_likelihood_reward(name):
    reward_fn = {**PROBABILITY_REWARDS, **LOG_REWARDS}[name]
    missing = torch.tensor([False, True, False])
    plain = reward_fn()
    default = reward_fn(missing=missing)
    excluded = reward_fn(missing=missing, missing_answer="exclude")
    assert math.isnan(excluded[1])
    if name == "nover":  # ranks move when a completion leaves the ranking: rows 0, 2 ranked alone
        assert torch.allclose(excluded[[0, 2]], torch.tensor([1.0, 0.5]))
        assert default.tolist() == [1.0, 0.0, 0.5]
        return
    assert torch.equal(excluded[[0, 2]], plain[[0, 2]])
    assert torch.equal(reward_fn(missing=missing, missing_answer="score"), plain)
    if name in PROBABILITY_REWARDS:
        assert default[1].item() == 0.0 and torch.equal(default[[0, 2]], plain[[0, 2]])  # p(y*|x,z) = 0
        assert torch.equal(reward_fn(missing=missing, missing_answer="zero"), default)
    else:
        assert math.isnan(default[1])  # log 0 = −inf has no finite advantage: excluded
        with pytest.raises(ValueError, match="exclude"):
            reward_fn(missing=missing, missing_answer="zero")
    with pytest.raises(ValueError, match="missing_answer"):
        apply_missing_answer(plain, missing, "drop")


def test_truncation_overrides_the_missing_answer_rule():
    missing = torch.tensor([True, True, False])
    truncated = torch.tensor([True, False, False])
    out = verifree_reward(LOGP, MASK, truncated, 0.5, missing, "exclude")
    assert out[0].item() == 0.5 and math.isnan(out[1]) and out[2] == SUMS[2].exp()


def test_cut_trace():
    eos, marker = 9, [7, 8]
    # the first marker ends the trace (a stopping time); the policy term covers the trace and the marker
    cut = cut_trace([3, 7, 8, 4, 7, 8, 5, eos], marker, {eos}, truncated=False, at="first")
    assert (cut.trace, cut.policy_length, cut.marker_found, cut.marker_count) == ([3], 3, True, 2)
    cut = cut_trace([3, 4, eos], marker, {eos}, truncated=False, at="first")
    # no marker: the whole completion (stop token dropped) is the trace; the policy term covers everything
    assert (cut.trace, cut.policy_length, cut.missing, cut.marker_count) == ([3, 4], 3, True, 0)
    cut = cut_trace([3, 4, eos], marker, {eos}, truncated=True, at="first")  # truncated: nothing dropped
    assert (cut.trace, cut.policy_length, cut.truncated) == ([3, 4, eos], 3, True)
    cut = cut_trace([3, 7, 8, 6], marker, {eos}, truncated=True, at="first")
    assert (cut.trace, cut.policy_length, cut.missing, cut.truncated) == ([3], 3, False, True)
    assert cut_trace([3, 7, 8], [], {eos}, truncated=False, at="first").missing


@pytest.mark.parametrize("template", [PlainTemplate(), ChatTemplate()])
def test_answer_layout_does_not_score_eos(template):
    tokenizer = build_char_tokenizer()
    prompt, trace = encode(tokenizer, "Q:12+30\nT:"), encode(tokenizer, "2+0=2,1+3=4")
    laid = answer_layout(template, tokenizer, prompt, trace, "42", score_eos=False)
    marker = encode(tokenizer, template.answer_prefix)
    assert laid.ids[: laid.answer_start] == prompt + trace + marker
    # the span is y* and the template's end-of-answer suffix: no EOS (VeriFree, GML, RLPR, NOVER)
    assert laid.ids[laid.answer_start :] == encode(tokenizer, "42" + template.answer_suffix())
    with_eos = answer_layout(template, tokenizer, prompt, trace, "42", score_eos=True)
    assert with_eos.ids == laid.ids + [tokenizer.eos_token_id]
    with pytest.raises(ValueError, match="no token to score"):
        answer_layout(PlainTemplate(), tokenizer, prompt, trace, "", score_eos=False)
