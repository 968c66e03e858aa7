"""Variational reasoning (Zhou et al., 2025): thinking traces z as latent variables of log P(Y_x|x).

Notation (see `docs/methods/variational_reasoning.md`): x question, z thinking trace, Y = Y_x the set
of correct answers, π the prior/policy π_θ(z, y|x) = π_θ(z|x) π_θ(y|x, z), q = q_φ(z|x, y′) the
posterior that sees an answer hint y′. Equation numbers refer to arXiv 2509.22637 v2.

Conventions: the last dimension indexes the traces of one question (K posterior samples, or M
prior samples); leading dimensions are batch dimensions and are never reduced. Sequence-level
log-probabilities are sums over the trace's tokens, computed by the caller
(`objectives/logprobs.py`). All functions are pure: no I/O, no model calls.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def _softmax_or_zero(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension; rows whose entries are all −inf give zeros instead of NaN."""
    peak = logits.detach().amax(dim=-1, keepdim=True)
    peak = torch.where(torch.isneginf(peak), torch.zeros_like(peak), peak)
    unnormalised = torch.exp(logits - peak)
    total = unnormalised.sum(dim=-1, keepdim=True)
    return unnormalised / total.clamp(min=torch.finfo(total.dtype).tiny)


def iwae_bound(log_p_joint: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Multi-trace (IWAE) bound, `log_p_joint [..., K]`, `log_q [..., K]` -> `[...]` (Eq. 5).

    L^K = log (1/K) Σ_k exp(log π(z_k, Y|x) − log q(z_k|x, y′)), z_1..K ~ q, with
    log π(z, Y|x) = log π(z|x) + log π(Y|x, z). One draw of L^K is a stochastic estimate: its
    expectation satisfies E[L^K] ≤ E[L^{K+1}] ≤ log P(Y|x), but a single draw can exceed log P(Y|x).
    K = 1 gives the single-sample ELBO estimate.
    """
    log_w = log_p_joint - log_q
    return torch.logsumexp(log_w, dim=-1) - math.log(log_w.shape[-1])


def normalized_weights(log_w: torch.Tensor) -> torch.Tensor:
    """Self-normalised importance weights ρ̃, `log_w [..., K]` -> `[..., K]`: softmax over the last dim.

    ρ̃_k = ρ_k / Σ_j ρ_j with log ρ_k = `log_w[..., k]` (Eq. 6 uses log ρ_k = log π(z_k, Y|x) −
    log q(z_k|x, y′); Eq. 8 its practical form, `practical_log_weights`). Entries at −inf (e.g.
    Acc = 0) get weight 0. A row whose entries are all −inf, where the softmax is undefined, gives
    all zeros rather than NaN, so a question with no usable trace contributes nothing.
    """
    return _softmax_or_zero(log_w)


def iwae_curve(log_w_rows: Sequence[torch.Tensor], k: int) -> dict[str, float]:
    """Mean IWAE bound L^{K'} over questions for K' = 1, 2, 4, …, ≤ k: `{str(K'): value}`.

    `log_w_rows[q]` `[K_q]` holds log π(z_k, Y|x) − log q(z_k|x, y′) of question q's traces
    z_1..K_q ~ q. Each row is cut into ⌊K_q/K'⌋ disjoint blocks of K' traces (a remainder is left
    out) and L^{K'} of the blocks averaged (`iwae_bound`): with i.i.d. traces every block is one
    draw of L^{K'}, so a question's value is an unbiased estimate of E[L^{K'}] that uses all its
    traces. The questions' values are then averaged (a row with no whole block gives NaN).
    """
    out = {}
    size = 1
    while size <= k:
        values = []
        for row in log_w_rows:
            blocks = row[: (len(row) // size) * size].reshape(-1, size)
            values.append(float(iwae_bound(blocks, torch.zeros_like(blocks)).mean()))
        out[str(size)] = sum(values) / max(len(values), 1)
        size *= 2
    return out


def effective_sample_size(weights: torch.Tensor) -> torch.Tensor:
    """Kish's effective sample size of normalised weights, `[..., K]` -> `[...]`: 1 / Σ_k ρ̃_k².

    K for uniform weights, 1 when one trace carries all the weight. `weights` must sum to 1 over
    the last dimension (`normalized_weights`); a row of zeros (no usable trace) gives inf.
    """
    return 1.0 / (weights**2).sum(dim=-1)


def elbo(log_p_joint: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Monte Carlo ELBO, `log_p_joint [..., K]`, `log_q [..., K]` -> `[...]`, traces z_k ~ q.

    (1/K) Σ_k (log π(z_k, Y|x) − log q(z_k|x, y′)), an unbiased estimate of
    E_q[log π(Y|x, z)] − KL(q(z|x, y′) ‖ π(z|x)) = log P(Y|x) − KL(q ‖ P(z|x, Y)).
    """
    return (log_p_joint - log_q).mean(dim=-1)


def iwae_surrogate(log_p_joint: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Surrogate for the θ-gradient of the IWAE bound, `[..., K]` -> `[...]` (Eq. 6).

    S = Σ_k sg(ρ̃_k) · log π_θ(z_k, Y|x), ρ̃ = softmax_k(log π(z_k, Y|x) − log q(z_k|x, y′)),
    so ∇_θ S = Σ_k ρ̃_k ∇_θ log π_θ(z_k, Y|x), whose expectation over z_1..K ~ q is ∇_θ E[L^K]
    when q does not depend on θ. Maximise S (its negative is the ρ̃-weighted SFT loss). The
    weights are detached and no gradient reaches `log_q`. Its value is not the bound (use
    `iwae_bound`). Traces with zero weight contribute 0 even where log π = −inf.
    """
    weights = normalized_weights((log_p_joint - log_q).detach())
    safe = torch.where(weights > 0, log_p_joint, torch.zeros_like(log_p_joint))
    return (weights * safe).sum(dim=-1)


def practical_log_weights(
    trace_logp_prior: torch.Tensor,
    trace_logp_posterior: torch.Tensor,
    trace_lengths: torch.Tensor,
    log_estimator: torch.Tensor,
) -> torch.Tensor:
    """Practical log-weights log ρ_k of Eq. 8, all `[..., K]` -> `[..., K]`.

    ρ_k = (π(z_k|x) / q(z_k|x, y′))^{1/|z_k|} · π̂(Y|x, z_k), in log space:
    log ρ_k = (log π(z_k|x) − log q(z_k|x, y′)) / |z_k| + log π̂(Y|x, z_k).
    `trace_logp_*` are sums of token log-probs over the trace, `trace_lengths` its token count
    |z_k|, `log_estimator` one of `log_acc_estimator`, `log_gml_estimator`,
    `log_likelihood_estimator`. Normalise within a question with `normalized_weights`.
    Lengths must be ≥ 1: an empty trace has no per-token ratio, and a ValueError asks the caller
    to filter such traces (as the pipeline filters over-long ones) rather than weight them silently.
    """
    lengths = torch.as_tensor(trace_lengths, device=trace_logp_prior.device)
    if (lengths < 1).any():
        raise ValueError("trace_lengths must be >= 1; filter out empty traces before weighting (Eq. 8)")
    per_token_log_ratio = (trace_logp_prior - trace_logp_posterior) / lengths.to(trace_logp_prior.dtype)
    return per_token_log_ratio + log_estimator


def practical_weights(
    trace_logp_prior: torch.Tensor,
    trace_logp_posterior: torch.Tensor,
    trace_lengths: torch.Tensor,
    log_estimator: torch.Tensor,
    valid: torch.Tensor,
) -> torch.Tensor:
    """Normalised practical weights ρ̃ of Eq. 8 within each question, all `[..., K]` -> `[..., K]`.

    ρ̃_k = ρ_k / Σ_j ρ_j over the traces with `valid[..., k]` True (`practical_log_weights`,
    `normalized_weights`); a filtered trace (no answer marker, cut by the token budget) gets 0, and
    a question with no trace of positive weight gets all zeros (the caller falls back).
    """
    log_w = practical_log_weights(trace_logp_prior, trace_logp_posterior, trace_lengths, log_estimator)
    return normalized_weights(torch.where(valid.bool(), log_w, torch.full_like(log_w, -math.inf)))


def log_acc_estimator(
    num_correct: torch.Tensor | int, num_samples: torch.Tensor | int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Acc estimator of log π(Y|x, z): log(c / n), `[...]` -> `[...]`; −inf when c = 0.

    c of n answers sampled from π(y|x, z) were graded correct. n must be ≥ 1 and 0 ≤ c ≤ n.
    """
    correct = torch.as_tensor(num_correct, dtype=dtype)
    samples = torch.as_tensor(num_samples, dtype=dtype, device=correct.device)
    if (samples < 1).any() or (correct < 0).any() or (correct > samples).any():
        raise ValueError("need num_samples >= 1 and 0 <= num_correct <= num_samples")
    return torch.log(correct) - torch.log(samples)


def _masked_token_sum(token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    keep = mask.bool()
    return torch.where(keep, token_logprobs, torch.zeros_like(token_logprobs)).sum(dim=-1)


def log_gml_estimator(answer_token_logprobs: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """GML estimator of log π(Y|x, z), `[..., T]` -> `[...]`: log of the geometric mean likelihood.

    (1/Σ_t m_t) Σ_t m_t log π(y*_t | x, z, y*_<t) over the reference answer's tokens (mask m).
    Padding positions are ignored whatever they hold; an empty mask gives 0 (the empty product).
    """
    count = answer_mask.to(answer_token_logprobs.dtype).sum(dim=-1)
    return _masked_token_sum(answer_token_logprobs, answer_mask) / count.clamp(min=1)


def log_likelihood_estimator(answer_token_logprobs: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """L estimator of log π(Y|x, z), `[..., T]` -> `[...]`: Σ_t m_t log π(y*_t | x, z, y*_<t).

    The full likelihood of the reference answer (high variance across traces). Padding positions
    are ignored whatever they hold; an empty mask gives 0.
    """
    return _masked_token_sum(answer_token_logprobs, answer_mask)


def forward_kl_posterior_weights(log_likelihood_y_given_z: torch.Tensor) -> torch.Tensor:
    """Forward-KL weights w̃ of Eq. 9, `[..., M]` -> `[..., M]`, detached.

    For z_1..M ~ π(z|x): w̃_m = π(Y|x, z_m) / Σ_j π(Y|x, z_j) = softmax_m(log π(Y|x, z_m)), so
    Σ_m w̃_m δ(z_m) is a self-normalised estimate of the true posterior P(z|x, Y). Entries at −inf
    (no correct answer) get weight 0; a row that is all −inf gives all zeros (no signal).
    """
    return _softmax_or_zero(log_likelihood_y_given_z.detach())


def weighted_posterior_nll(weights: torch.Tensor, log_q_sequences: torch.Tensor) -> torch.Tensor:
    """Forward-KL posterior loss of Eq. 9, `weights [..., M]`, `log_q_sequences [..., M]` -> `[...]`.

    −Σ_m w̃_m log q_φ(z_m|x, y′) on prior samples z_m, whose φ-gradient −Σ_m w̃_m ∇_φ log q_φ(z_m)
    estimates ∇_φ KL(P(z|x, Y) ‖ q_φ). Zero-weight traces contribute 0 even where log q = −inf.
    """
    safe = torch.where(weights > 0, log_q_sequences, torch.zeros_like(log_q_sequences))
    return -(weights * safe).sum(dim=-1)
