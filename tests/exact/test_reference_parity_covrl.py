"""The verifier-free rewards of the `covrl` trainer against the released reference trainers.

Each test re-expresses, in a few lines of our own, what the reference code computes (the comment names
the repository, file and function), and compares it on random inputs with the pieces the trainer
uses, with the trainer's defaults (`CoVRLConfig(reward=...)`): rewards, advantages, loss values and,
where the loss has a gradient, gradients (autograd) to float precision. JEPO has no public code: its
defaults follow the paper's formula (the methods notes) and are checked in test_likelihood_rewards.py.
"""

import math

import pytest
import torch

from reasoning.data.templates import PlainTemplate, answer_layout, cut_trace, encode
from reasoning.models.tiny import build_char_tokenizer
from reasoning.objectives.covrl import decoder_weights
from reasoning.objectives.policy import aggregate_loss, clipped_surrogate, group_baseline_advantages
from reasoning.rewards.likelihood import (
    RLPRStdFilter,
    group_reward_std,
    latro_reward,
    nover_log_perplexity,
    nover_reward,
    rlpr_reward,
    rlpr_std_filter,
    verifree_answer_nll,
    verifree_reward,
)
from reasoning.trainers.covrl import (
    AGGREGATION,
    RLPR_STD_EPS,
    CoVRLConfig,
)

G, GROUPS = 4, 3
N = G * GROUPS
EOS, MARKER = 2, [7, 8]


def random_completions(seed):
    """Token lists over {3..9} (the marker 7 8 appears in some, twice in a few), some truncated."""
    generator = torch.Generator().manual_seed(seed)
    completions, truncated = [], []
    for i in range(N):
        length = int(torch.randint(3, 9, (1,), generator=generator))
        ids = torch.randint(3, 7, (length,), generator=generator).tolist()
        if i % 3 != 1:  # a marker at a random place, sometimes two
            at = int(torch.randint(0, length, (1,), generator=generator))
            ids[at:at] = MARKER
            if i % 5 == 0:
                ids += MARKER + [5]
        cut = i % 4 == 3
        completions.append(ids if cut else ids + [EOS])
        truncated.append(cut)
    return completions, torch.tensor(truncated)


def padded(rows, width, generator, scale=1.0):
    """Random log-probs `[N, width]` (junk in the padding) and the mask of the first len(row) positions."""
    logp = -scale * torch.rand(len(rows), width, generator=generator, dtype=torch.float64) - 0.01
    mask = torch.tensor([[float(t < n) for t in range(width)] for n in rows], dtype=torch.float64)
    return torch.where(mask.bool(), logp, torch.full_like(logp, -1e4)), mask


def verifree_cut(ids, truncated):
    """re-expresses sail-sg/VeriFree verifree.py (VeriFreeActor.step): `think` = the response up to and
    including the first `<answer` (`model_response.find`), or the whole response (`token_ids`) without one;
    `answer_ids` empty without one; a `no_eos` (length-finished) sample keeps its think span."""
    for i in range(len(ids) - len(MARKER) + 1):
        if ids[i : i + len(MARKER)] == MARKER:
            return i + len(MARKER), True
    return len(ids), False


def test_verifree_rewards_advantages_and_loss_match_the_released_trainer():
    config = CoVRLConfig(reward="verifree", alpha=1.0)
    completions, truncated = random_completions(0)
    generator = torch.Generator().manual_seed(1)
    width = max(len(c) for c in completions)
    # our cut and the reference's agree on the policy span and on which samples have an answer
    cuts = [cut_trace(c, MARKER, {EOS}, bool(t), at="first") for c, t in zip(completions, truncated)]
    reference_cut = [verifree_cut(c, t) for c, t in zip(completions, truncated)]
    assert [c.policy_length for c in cuts] == [n for n, _ in reference_cut]
    assert [not c.missing for c in cuts] == [found for _, found in reference_cut]
    missing = torch.tensor([c.missing for c in cuts])
    assert missing.any() and (truncated & ~missing).any() and (~truncated & ~missing).any()
    think_logp, think_mask = padded([c.policy_length for c in cuts], width, generator)
    answer_lengths = [int(n) for n in torch.randint(1, 5, (N,), generator=generator)]
    old_answer, answer_mask = padded(answer_lengths, 5, generator, scale=0.6)
    noise = 0.05 * torch.randn(think_logp.shape, generator=generator, dtype=torch.float64)
    new_think = think_logp + noise
    new_answer = old_answer + 0.05 * torch.randn(old_answer.shape, generator=generator, dtype=torch.float64)
    new_think.requires_grad_(True)
    new_answer.requires_grad_(True)

    # re-expresses sail-sg/VeriFree verifree.py: VeriFreeLearner.learn (logp_reward = Σ answer log-probs,
    # −inf without an answer or with no_eos), learning_step (reward_source p: exp; compute_rloo_advantages;
    # pg_loss = −A Σ_t new_logps·think_mask; sft_coef_source reward: −Σ_t new_logps·answer_mask·R;
    # both .mean() over the batch with loss_mask 1, ignore_no_eos False by default in oat)
    logp_reward = (old_answer * answer_mask).sum(-1)
    logp_reward = torch.where(missing | truncated, torch.full_like(logp_reward, -math.inf), logp_reward)
    ref_reward = logp_reward.exp()
    grouped = ref_reward.view(-1, G)
    ref_advantage = ((grouped - grouped.mean(1, keepdim=True)) * G / (G - 1)).reshape(-1)
    ref_pg = (-ref_advantage * (new_think * think_mask).sum(-1)).mean()
    ref_sft = (-(new_answer * answer_mask).sum(-1) * ref_reward).mean()

    # ours, with the trainer's defaults and its own reduction and weights
    reward = verifree_reward(
        old_answer,
        answer_mask,
        truncated=truncated,
        truncated_reward=config.truncated_reward,
        missing=missing,
        missing_answer=config.missing_answer,
    )
    advantage = group_baseline_advantages(reward, G, baseline=config.baseline, scale=config.scale_advantages)
    per_token, _ = clipped_surrogate(new_think, think_logp, advantage, config.epsilon, mask=think_mask)
    policy = aggregate_loss(per_token, think_mask, AGGREGATION[config.loss_type])
    weights = decoder_weights(config.reward, reward, old_answer, answer_mask, truncated, G)
    decoder = config.answer_nll_coef * verifree_answer_nll(new_answer, answer_mask, weights)

    assert config.nll_coef == 0  # CoVRL's selective NLL is not part of VeriFree's loss
    torch.testing.assert_close(reward, ref_reward, rtol=1e-12, atol=0)
    assert (reward[missing | truncated] == 0).all() and (reward[~(missing | truncated)] > 0).all()
    torch.testing.assert_close(advantage, ref_advantage, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(decoder, ref_sft, rtol=1e-12, atol=0)
    # values: the reference's policy term is −A Σ log π (REINFORCE), ours the surrogate −A Σ π/π_old: they
    # differ in value and have the same gradient at π = π_old (`on_policy`, the
    # first step on a batch; the released run makes one step per batch, num_ppo_epochs 1)
    got = torch.autograd.grad(policy + decoder, (new_think, new_answer), retain_graph=True)
    want = torch.autograd.grad(ref_pg + ref_sft, (new_think, new_answer))
    on_policy = torch.autograd.grad(
        aggregate_loss(
            clipped_surrogate(new_think, new_think.detach(), advantage, config.epsilon, mask=think_mask)[0],
            think_mask,
            AGGREGATION[config.loss_type],
        ),
        new_think,
    )[0]
    torch.testing.assert_close(on_policy, want[0], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-14)
    assert want[0].abs().max() > 1e-3 and want[1].abs().max() > 1e-3


def test_latro_rewards_advantages_and_loss_match_the_released_trainer():
    config = CoVRLConfig(reward="latro", alpha=1.0)
    generator = torch.Generator().manual_seed(2)
    trace_lengths = [int(n) for n in torch.randint(1, 7, (N,), generator=generator)]
    trace_logp, trace_mask = padded(trace_lengths, 6, generator)
    shape, kind = trace_logp.shape, torch.float64
    reference_logp = trace_logp + 0.3 * torch.randn(shape, generator=generator, dtype=kind)
    answer_lengths = [int(n) for n in torch.randint(1, 4, (N,), generator=generator)]
    answer_logp, answer_mask = padded(answer_lengths, 3, generator)
    new_trace = trace_logp + 0.02 * torch.randn(shape, generator=generator, dtype=kind)
    new_trace.requires_grad_(True)
    # re-expresses SalesforceAIResearch/LaTRO LaTRO/trainer/latro_trainer.py (LatroTrainer.train):
    # rewards = Σ log p(y|x,z) (get_logprob_reward), kl_penalty = −kl_coef (logprobs − ref_logprobs) over
    # the rationale, RLOO baseline (sum − r)/(k − 1), rloo_loss = (−A · Σ_t rationale logprobs).mean(),
    # sft_penalty 0 by default
    q = (trace_logp * trace_mask).sum(-1)
    p0 = (reference_logp * trace_mask).sum(-1)
    adjusted = (answer_logp * answer_mask).sum(-1) - 0.05 * (q - p0)
    grouped = adjusted.view(-1, G)
    ref_advantage = (grouped - (grouped.sum(1, keepdim=True) - grouped) / (G - 1)).reshape(-1)
    ref_loss = (-ref_advantage * (new_trace * trace_mask).sum(-1)).mean()
    # ours
    reward = latro_reward(answer_logp, answer_mask, q, p0, config.latro_beta)
    advantage = group_baseline_advantages(reward, G, baseline=config.baseline, scale=config.scale_advantages)
    per_token, _ = clipped_surrogate(
        new_trace, new_trace.detach(), advantage, config.epsilon, mask=trace_mask
    )
    loss = aggregate_loss(per_token, trace_mask, AGGREGATION[config.loss_type])
    assert config.answer_nll_coef == 0 and config.nll_coef == 0
    torch.testing.assert_close(reward, adjusted, rtol=1e-12, atol=0)
    torch.testing.assert_close(advantage, ref_advantage, rtol=1e-10, atol=1e-12)
    (got,) = torch.autograd.grad(loss, new_trace, retain_graph=True)
    (want,) = torch.autograd.grad(ref_loss, new_trace)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    assert want.abs().max() > 1e-2
    # the per-token mean (the old default) is not the released reduction
    mean_loss = aggregate_loss(per_token, trace_mask, "grpo")
    (mean_grad,) = torch.autograd.grad(mean_loss, new_trace)
    assert (mean_grad - want).abs().max() > 0.1 * want.abs().max()


def reference_rlpr_advantages(scores):
    """re-expresses OpenBMB/RLPR verl/trainer/ppo/core_algos.py (compute_grpo_outcome_advantage):
    (r − mean)/(std + 1e-6) per group, 0 where the group's std < 1e-6 (std_filter)."""
    grouped = scores.view(-1, G)
    mean, std = grouped.mean(1, keepdim=True), grouped.std(1, keepdim=True)
    out = torch.where(std < 1e-6, torch.zeros_like(grouped), (grouped - mean) / (std + 1e-6))
    return out.reshape(-1), std.expand_as(grouped).reshape(-1)


def test_rlpr_reward_advantages_and_std_filter_match_the_released_trainer():
    config = CoVRLConfig(
        reward="rlpr", alpha=1.0, rlpr_filter_ema_start=2, rlpr_filter_start=4, rlpr_filter_momentum=0.9
    )
    assert config.scale_advantages == "group" and config.rlpr_std_filter_beta == 0.5
    assert config.rlpr_format_coef == 0.1 and config.truncated_reward == "score"
    schedule = RLPRStdFilter(
        beta=config.rlpr_std_filter_beta,
        momentum=config.rlpr_filter_momentum,
        ema_start=config.rlpr_filter_ema_start,
        filter_start=config.rlpr_filter_start,
    )
    generator = torch.Generator().manual_seed(3)
    # reference state (ray_trainer.py RayPPOTrainer.fit, filter_mode EMA): score_std_list, ema_mean
    step_means, ema, bound = [], None, 0.0
    kept_some = dropped_some = False
    for step in range(1, 8):
        answer_lengths = [int(n) for n in torch.randint(1, 4, (N,), generator=generator)]
        answer_logp, answer_mask = padded(answer_lengths, 3, generator, 2.0)
        no_trace = torch.rand(GROUPS, generator=generator, dtype=torch.float64).repeat_interleave(G) * 0.3
        format_ok = torch.rand(N, generator=generator) < 0.7
        truncated = torch.rand(N, generator=generator) < 0.2
        answer_logp[:G] = answer_logp[0]  # a group whose rewards agree: std 0
        answer_mask[:G] = answer_mask[0]
        format_ok[:G] = True
        truncated[:G] = False
        # re-expresses OpenBMB/RLPR verl/workers/reward_manager/prob.py (ProbRewardManager.__call__,
        # compute_scoreB with mean_exp_log_softmax, shaping threshold_0, format_coefficient 0.1)
        score_b = torch.stack([answer_logp[i][answer_mask[i].bool()].exp().mean() for i in range(N)])
        delta = score_b - no_trace
        delta = torch.where(delta < 0, torch.zeros_like(delta), delta)
        ref_reward = 0.9 * delta + 0.1 * format_ok.double()
        ref_advantage, stds = reference_rlpr_advantages(ref_reward)
        # ray_trainer.py: at the start of a step >= filter_start the EMA is set (first: mean of the
        # warm-up step means) or moved by the last step's mean std; the bound is std_filter_beta × EMA
        if step >= config.rlpr_filter_start:
            if ema is None:
                ema = sum(step_means) / len(step_means)
            else:
                ema = step_means[-1] * (1 - config.rlpr_filter_momentum) + ema * config.rlpr_filter_momentum
            bound = ema * config.rlpr_std_filter_beta
        ref_keep = stds >= bound if step >= config.rlpr_filter_start else torch.ones(N, dtype=torch.bool)
        if step >= config.rlpr_filter_ema_start:
            step_means.append(stds[torch.isfinite(stds)].mean().item())

        # ours: the trainer's pieces with its defaults
        reward = rlpr_reward(
            answer_logp,
            answer_mask,
            no_trace,
            format_ok=format_ok,
            format_coef=config.rlpr_format_coef,
            truncated=truncated,
            truncated_reward=config.truncated_reward,
            missing=torch.zeros(N, dtype=torch.bool),
            missing_answer=config.missing_answer,
        )
        advantage = group_baseline_advantages(
            reward, G, config.baseline, config.scale_advantages, eps=RLPR_STD_EPS, min_std=RLPR_STD_EPS
        )
        our_bound = schedule.begin_step()
        schedule.record(group_reward_std(reward, G))
        keep = torch.ones(N, dtype=torch.bool)
        if our_bound is not None:
            keep = rlpr_std_filter(reward, G, our_bound)

        torch.testing.assert_close(reward, ref_reward, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(advantage, ref_advantage, rtol=1e-9, atol=1e-12)
        assert (advantage[:G] == 0).all()
        if step >= config.rlpr_filter_start:
            assert our_bound == pytest.approx(bound, rel=1e-12)
        else:
            assert our_bound is None
        assert torch.equal(keep, ref_keep)
        kept_some |= bool(keep[G:].any()) and step >= config.rlpr_filter_start
        dropped_some |= bool((~keep[G:]).any())
    assert kept_some and dropped_some  # the filter was exercised both ways


def test_nover_reward_matches_the_released_code():
    config = CoVRLConfig(reward="nover", alpha=1.0)
    assert config.truncated_reward == 0.0 and config.missing_answer == "zero"
    generator = torch.Generator().manual_seed(4)
    for trial in range(20):
        lengths = [int(n) for n in torch.randint(1, 5, (N,), generator=generator)]
        answer_logp, answer_mask = padded(lengths, 4, generator, scale=3.0)
        trace_lengths = (10 ** (4 * torch.rand(N, generator=generator))).long() - 1  # 0 .. 9999 tokens
        valid = torch.rand(N, generator=generator) < 0.75
        # exact ties: rows 1 and 2 of each group copy row 0 (same y* log-probs and trace length)
        for g in range(GROUPS):
            for copy in (1, 2) if trial % 2 else (2,):
                answer_logp[g * G + copy], answer_mask[g * G + copy] = answer_logp[g * G], answer_mask[g * G]
                trace_lengths[g * G + copy] = trace_lengths[g * G]
        # re-expresses thinkwee/NOVER utils.py (calculate_perplexity: nll = −mean log p over the target,
        # norm = max(1, 1 + log10(reasoning_len)), ppl = exp(nll / norm)) and reward_functions.py
        # (reasoning_reward: valid completions sorted by ppl with Python's stable sort, reward
        # (n − rank)/n; format-invalid ones 0)
        ref, ref_ppl = [], {}
        for g in range(GROUPS):
            rows = range(g * G, (g + 1) * G)
            ppl = {}
            for i in rows:
                if valid[i]:
                    nll = -(answer_logp[i][answer_mask[i].bool()]).mean().item()
                    norm = max(1.0, 1 + math.log10(trace_lengths[i].item())) if trace_lengths[i] > 0 else 1.0
                    ppl[i] = math.exp(nll / norm)
            ref_ppl.update(ppl)
            ordered = sorted(ppl.items(), key=lambda pair: pair[1])
            rewards = dict.fromkeys(rows, 0.0)
            for rank, (i, _) in enumerate(ordered):
                rewards[i] = (len(ordered) - rank) / len(ordered)
            ref += [rewards[i] for i in rows]
        ours = nover_reward(
            answer_logp,
            answer_mask,
            G,
            trace_lengths,
            format_ok=valid,
            log_base=config.nover_log_base,
            truncated=torch.zeros(N, dtype=torch.bool),
            truncated_reward=config.truncated_reward,
            missing=~valid,
            missing_answer=config.missing_answer,
        )
        torch.testing.assert_close(ours, torch.tensor(ref, dtype=torch.float64), rtol=0, atol=1e-12)
        log_ppl = nover_log_perplexity(answer_logp, answer_mask, trace_lengths, config.nover_log_base)
        for i, value in ref_ppl.items():
            assert math.exp(log_ppl[i].item()) == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize("answer", ["42", "7"])
def test_answer_span_matches_verifree_and_gml_no_eos(answer):
    tokenizer = build_char_tokenizer()
    template = PlainTemplate()
    prompt = encode(tokenizer, template.prior_prompt("12+30"))
    response = "2+0=2,1+3=4\nA:41\nA:9"
    # re-expresses sail-sg/VeriFree verifree.py (VeriFreeActor.step): think_text = response[:find(marker)]
    # + marker; answer_ids = tokenizer(y* + closing) with no EOS; the scored span is answer_ids. The same
    # holds in sail-sg/variational-reasoning estimate_logp_initial_reasoning_model.py (answer_len =
    # len(tokenizer(answer_text)), no EOS).
    cut_at = response.find(template.answer_prefix)
    think_ids = encode(tokenizer, response[:cut_at] + template.answer_prefix)
    answer_ids = encode(tokenizer, answer + template.answer_suffix())
    reference_ids = prompt + think_ids + answer_ids
    # ours: the trainer's cutter and layout on the generated token ids
    completion = encode(tokenizer, response) + [tokenizer.eos_token_id]
    marker = encode(tokenizer, template.answer_prefix)
    cut = cut_trace(completion, marker, {tokenizer.eos_token_id}, truncated=False, at="first")
    laid = answer_layout(template, tokenizer, prompt, cut.trace, answer, score_eos=CoVRLConfig().score_eos)
    assert laid.ids == reference_ids
    assert laid.ids[laid.answer_start :] == answer_ids
    assert cut.policy_length == len(think_ids)  # the policy term covers VeriFree's think span
