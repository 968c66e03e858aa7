"""Modified SubTB against GFNOrg/gfn-lm-tuning's reduction, re-expressed in a few lines.

The reference (`next_sentence/utils.py`, `modified_subtb_loss`; the same loop in
`infill_subj_arithmetic/main.py`) takes one batch of one prompt's samples, builds the per-step
residuals δ_k, and divides the λ-weighted sum of the squared subtrajectory residuals of the *whole
batch* by the batch's total weight Σ λ^{ℓ−1}·(number of valid pairs of length ℓ): each sequence weighs
by its number of pairs. Our `modified_subtrajectory_balance(..., normalization="gfn-lm-tuning")`
returns per-row values whose mean is that quotient (per `group`, then the mean over groups).
"""

import pytest
import torch

from reasoning.objectives.gflownet import (
    mask_after_eos,
    modified_subtrajectory_balance,
    subtb_log_normalizer,
)

STOP = 7  # the termination token id of the toy batches
PROMPT = 3  # prompt length: the reference slices generated_text after it


def reference_modified_subtb(log_pf, log_r, log_pterm, generated_text, stop, prompt_len, lam):
    # re-expresses GFNOrg/gfn-lm-tuning/next_sentence/utils.py (modified_subtb_loss)
    delta = log_r[:, :-1] + log_pf[:, :-1] + log_pterm[:, 1:] - log_r[:, 1:] - log_pterm[:, :-1]
    cumulative = torch.cat([torch.zeros_like(delta[:, :1]), delta], 1).cumsum(1)
    stopped = (generated_text[:, prompt_len:-1] == stop).cumsum(-1) >= 1  # at or after the stop token
    total, weight = 0.0, 0.0
    for length in range(1, generated_text.shape[1] - prompt_len):
        term = (cumulative[:, length:] - cumulative[:, :-length]) ** 2
        term = term.masked_fill(stopped[:, length - 1 :], 0.0)
        total = total + lam ** (length - 1) * term.sum()
        # (the reference multiplies an integer count by a Python float, which makes the weight float32;
        # counted in float64 here, so that the comparison holds to float64 precision for any λ)
        weight = weight + lam ** (length - 1) * (~stopped[:, length - 1 :]).sum().double()
    return total / weight


def random_rollouts(seed, batch=6, length=7):
    """A batch in the reference's layout: [B, prompt + L] ids with exactly one stop token per row
    (trace lengths 1..L−1, so every row has at least one pair) and float64 leaves [B, L]."""
    g = torch.Generator().manual_seed(seed)
    n = 1 + torch.randint(0, length - 1, (batch,), generator=g)  # trace tokens before the stop
    n[0], n[1] = 1, length - 1  # the shortest and the longest trace
    completion = torch.randint(0, STOP, (batch, length), generator=g)
    completion[torch.arange(length) >= n.unsqueeze(-1)] = STOP  # the stop token, then stop padding
    text = torch.cat([torch.full((batch, PROMPT), 1), completion], dim=1)

    def leaf():
        return torch.randn(batch, length, generator=g, dtype=torch.float64).requires_grad_(True)

    return text, n, leaf(), leaf(), leaf()


def our_layout(text, log_pf, log_r, log_pterm):
    """Our arguments: trace tokens only (mask), T = L − 1 trace positions, L prefixes s_0..s_{L−1}."""
    completion = text[:, PROMPT:]
    mask = mask_after_eos(completion[:, :-1], STOP, include_eos=False).double()
    return log_pf[:, :-1], log_pterm, mask, log_r


@pytest.mark.parametrize("lam", [1.0, 0.5, 2.0])
def test_gfn_lm_tuning_normalization_matches_the_reference_values_and_gradients(lam):
    text, n, log_pf, log_r, log_pterm = random_rollouts(0)
    leaves = [log_pf, log_r, log_pterm]
    reference = reference_modified_subtb(log_pf, log_r, log_pterm, text, STOP, PROMPT, lam)
    pf, terminal, mask, reward = our_layout(text, log_pf, log_r, log_pterm)
    assert mask.sum(-1).tolist() == n.tolist()
    ours = modified_subtrajectory_balance(pf, terminal, mask, reward, lam)  # the default normalisation
    assert ours.mean().item() == pytest.approx(reference.item(), rel=1e-12)
    reference_grads = torch.autograd.grad(reference, leaves, retain_graph=True)
    our_grads = torch.autograd.grad(ours.mean(), leaves, allow_unused=True, materialize_grads=True)
    for a, b in zip(our_grads, reference_grads):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-10)
        assert b.abs().max() > 1e-3
    # per-sequence normalisation is a different reduction of the same terms: it disagrees here,
    # because the rows' pair counts differ (1 pair for n = 1, 21 for n = 6)
    per_sequence = modified_subtrajectory_balance(pf, terminal, mask, reward, lam, normalization="sequence")
    assert abs(per_sequence.mean().item() - reference.item()) > 1e-3 * reference.item()


def test_gfn_lm_tuning_normalization_per_group_is_the_mean_of_the_reference_per_prompt():
    """Several prompts in one batch (`group`): the mean over rows is the mean over prompts of the
    reference loss of each prompt's samples (the reference's batch is one prompt's samples)."""
    parts = [random_rollouts(seed, batch=size) for seed, size in ((1, 4), (2, 4), (3, 4))]
    text = torch.cat([p[0] for p in parts])
    leaves = [torch.cat([p[k] for p in parts]).detach().requires_grad_(True) for k in (2, 3, 4)]
    log_pf, log_r, log_pterm = leaves
    group = torch.tensor([10] * 4 + [11] * 4 + [12] * 4)
    references = [
        reference_modified_subtb(log_pf[s], log_r[s], log_pterm[s], text[s], STOP, PROMPT, 0.8)
        for s in (slice(0, 4), slice(4, 8), slice(8, 12))
    ]
    reference = torch.stack(references).mean()
    pf, terminal, mask, reward = our_layout(text, log_pf, log_r, log_pterm)
    ours = modified_subtrajectory_balance(pf, terminal, mask, reward, 0.8, group=group)
    assert ours.mean().item() == pytest.approx(reference.item(), rel=1e-12)
    for a, b in zip(
        torch.autograd.grad(ours.mean(), leaves, retain_graph=True),
        torch.autograd.grad(reference, leaves),
    ):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-10)
    # the divisor depends only on the lengths and λ: computed for the whole batch, it reduces any
    # split of the rows (micro-batches that cut through groups) to the same total
    log_norm = subtb_log_normalizer(mask, 0.8, "gfn-lm-tuning", group)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    pieces = [order[:5], order[5:]]
    split = sum(
        modified_subtrajectory_balance(
            pf[i], terminal[i], mask[i], reward[i], 0.8, log_normalizer=log_norm[i]
        ).sum()
        for i in pieces
    )
    assert split.item() / 12 == pytest.approx(reference.item(), rel=1e-12)
