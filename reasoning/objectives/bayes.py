"""KL-regularised RL as Bayesian inference and distribution matching (DPG, GDC++, f-DPG).

Target p(x) = P(x)/Z with an unnormalised log P: exponential tilting a(x)·exp(r(x)/β), pointwise
constraints a(x)·b(x), or moment constraints a(x)·exp(λ·φ(x)). Samples x_i come from a proposal q
(q = π on-policy, a frozen copy off-policy); every sequence-level quantity is passed as a log
(sums of token log-probs, ~ −2000 for 1000 tokens) and exponentiated only as a ratio or inside a
log-sum-exp, so nothing overflows or underflows.

Conventions: sample tensors are `[..., N]` with the N samples of one estimate on the last
dimension (a context's samples, or a flat batch with an explicit context `index`); `log_z` is a
scalar or `[...]`, broadcast over the samples. Pseudo-rewards are detached and signed as rewards:
E_q[R(x)·∇ log π(x)] = −∇_θ D, so ascending E[R·log π] (loss −R·log π) minimises the divergence D.
They hold the importance ratio: R = (π/q)·r_f with r_f = −f′(π/p) the per-sample pseudo-reward of
naver/disco's f-divergence losses (`f_pseudo_reward`); a baseline b of r_f enters as (π/q)(r_f − b)
(`baselined_advantage`), which keeps the gradient unbiased for q ≠ π, as disco does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------- targets


def log_target(log_base: torch.Tensor, reward: torch.Tensor, beta: float) -> torch.Tensor:
    """Exponential tilting `[...] -> [...]`: log P(x) = log a(x) + r(x)/β.

    p*(x) = a(x)·exp(r(x)/β)/Z is the Bayesian posterior that KL-regularised RL with
    coefficient β targets: E_π[r] − β·KL(π‖a) = −β·KL(π‖p*) + β·log Z.
    """
    return log_base + reward / beta


def pointwise_log_target(log_base: torch.Tensor, constraint: torch.Tensor) -> torch.Tensor:
    """Pointwise constraint `[...] -> [...]`: log P(x) = log a(x) + log b(x), b ∈ {0, 1}.

    −inf where b(x) = 0 (e.g. b = "the answer is correct"); `constraint` is bool or 0/1.
    """
    return log_base.masked_fill(~constraint.bool(), float("-inf"))


def moment_log_target(log_base: torch.Tensor, features: torch.Tensor, lambdas: torch.Tensor) -> torch.Tensor:
    """Moment constraints `log_base [...]`, `features [..., M]`, `lambdas [M]` -> `[...]`.

    log P(x) = log a(x) + Σ_i λ_i φ_i(x): the maximum-entropy (minimum KL to a) distribution whose
    moments E_p[φ] are fixed by λ (fit λ with `fit_moment_lambdas`).
    """
    return log_base + (features.to(log_base.dtype) * lambdas.to(log_base.dtype)).sum(-1)


def self_normalized_moments(features: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
    """`features [..., N, M]`, `log_weights [..., N]` -> `[..., M]`: Σ_i w̃_i φ(x_i), w̃ = softmax(log w).

    With log w = log P − log q this is the self-normalised IS estimate of E_p[φ].
    """
    weights = torch.softmax(log_weights, dim=-1).to(features.dtype)
    return (weights.unsqueeze(-1) * features).sum(-2)


def fit_moment_lambdas(
    features: torch.Tensor,
    log_base_minus_log_proposal: torch.Tensor,
    target_moments: torch.Tensor,
    init: torch.Tensor | None = None,
    max_iter: int = 100,
    tol: float = 1e-9,
    ridge: float = 1e-10,
) -> torch.Tensor:
    """Fit λ `[M]` so that the target a·exp(λ·φ) has moments μ̄ under self-normalised IS.

    `features [N, M]` (or `[N]` for one constraint, then λ is `[]`), `log_base_minus_log_proposal
    [N]` = log a(x_i) − log q(x_i) for samples x_i ~ q, `target_moments [M]` = μ̄.
    Minimises the convex dual L(λ) = log Ẑ(λ) − λ·μ̄ with Ẑ(λ) = mean_i exp(log a − log q + λ·φ)_i:
    ∇L = Ê_λ[φ] − μ̄ (self-normalised moments), ∇²L = Ĉov_λ[φ]. Damped Newton steps
    (Hessian + `ridge`·I, Armijo backtracking) in float64 until max |∇L| < `tol`. If μ̄ lies
    outside the convex hull of the sampled φ no finite λ exists and λ grows for `max_iter` steps;
    check the result with `self_normalized_moments`. (disco uses SGD, lr 0.05, 1000 iterations.)
    """
    single = features.dim() == 1
    phi = (features.unsqueeze(-1) if single else features).double()
    log_w0 = log_base_minus_log_proposal.double()
    mu = torch.as_tensor(target_moments, dtype=torch.float64, device=phi.device).reshape(-1)
    lam = torch.zeros(phi.shape[-1], dtype=torch.float64, device=phi.device)
    if init is not None:
        lam = torch.as_tensor(init, dtype=torch.float64, device=phi.device).reshape(-1).clone()
    eye = torch.eye(phi.shape[-1], dtype=torch.float64, device=phi.device)

    def dual(lam: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(log_w0 + phi @ lam, dim=0) - lam @ mu

    for _ in range(max_iter):
        weights = torch.softmax(log_w0 + phi @ lam, dim=0)
        mean = weights @ phi
        grad = mean - mu
        if grad.abs().max() < tol:
            break
        centred = phi - mean
        hessian = centred.T @ (weights.unsqueeze(-1) * centred)
        step = torch.linalg.solve(hessian + ridge * (1 + hessian.diagonal().sum()) * eye, grad)
        value, slope, t = dual(lam), grad @ step, 1.0
        while t > 1e-12 and dual(lam - t * step) > value - 1e-4 * t * slope:
            t *= 0.5
        lam = lam - t * step
    lam = lam.to(features.dtype if features.is_floating_point() else torch.get_default_dtype())
    return lam.squeeze(0) if single else lam


# ------------------------------------------------------------------------------ partition function


def log_mean_exp(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log (1/N) Σ_i exp(x_i) over `dim`."""
    return torch.logsumexp(x, dim=dim) - math.log(x.shape[dim])


def estimate_log_z(log_target: torch.Tensor, log_proposal: torch.Tensor) -> torch.Tensor:
    """`log_target [..., N]`, `log_proposal [..., N]` -> `[...]`: log Ẑ = log (1/N) Σ_i P(x_i)/q(x_i).

    Ẑ is unbiased for Z = Σ_x P(x) (x_i ~ q); log Ẑ is consistent. Log space throughout.
    """
    return log_mean_exp(log_target - log_proposal, dim=-1)


def group_log_mean_exp(
    values: torch.Tensor, index: torch.Tensor, num_groups: int | None = None
) -> torch.Tensor:
    """`values [N]`, `index [N]` (group of each value, 0..C−1) -> `[C]`: log mean exp within each group.

    A scattered log-sum-exp (per-group max subtracted before exp); empty groups give −inf.
    """
    num_groups = int(index.max()) + 1 if num_groups is None else num_groups
    empty = torch.full((num_groups,), float("-inf"), dtype=values.dtype, device=values.device)
    peak = empty.scatter_reduce(0, index, values, reduce="amax", include_self=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    sums = torch.zeros_like(peak).scatter_add(0, index, torch.exp(values - peak[index]))
    counts = torch.bincount(index, minlength=num_groups).to(values.dtype)
    out = torch.log(sums) + peak - torch.log(counts.clamp(min=1))
    return torch.where(counts > 0, out, torch.full_like(out, float("-inf")))


def estimate_log_z_per_context(
    log_target: torch.Tensor, log_proposal: torch.Tensor, index: torch.Tensor, num_contexts: int | None = None
) -> torch.Tensor:
    """Conditional targets, one Z per prompt: `[N]`, `[N]`, `index [N]` -> `[C]`.

    log Ẑ_c = log (1/N_c) Σ_{i: index_i = c} P(x_i|c)/q(x_i|c); contexts without samples get −inf.
    (For the grouped layout N = C × K, `estimate_log_z` on `[C, K]` views gives the same.)
    """
    return group_log_mean_exp(log_target - log_proposal, index, num_contexts)


def combine_log_means(
    log_mean_a: torch.Tensor,
    count_a: torch.Tensor | float,
    log_mean_b: torch.Tensor,
    count_b: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running log-mean-exp: merge two estimates `[...]` with their sample counts -> (log mean, count).

    log m = log((n_a·e^{m_a} + n_b·e^{m_b}) / (n_a + n_b)), i.e. the log mean of the pooled
    samples; an estimate with count 0 is ignored (its value may be anything), both empty -> −inf.
    """
    dtype, device = log_mean_a.dtype, log_mean_a.device
    parts = torch.broadcast_tensors(
        log_mean_a,
        torch.as_tensor(log_mean_b, dtype=dtype, device=device),
        torch.as_tensor(count_a, dtype=dtype, device=device),
        torch.as_tensor(count_b, dtype=dtype, device=device),
    )
    log_means, counts = torch.stack(parts[:2], dim=-1), torch.stack(parts[2:], dim=-1)
    return pool_log_means(log_means, counts), counts.sum(-1)


def pool_log_means(log_means: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Windowed estimate: `log_means [..., W]`, `counts [..., W]` -> `[...]`.

    log (Σ_w n_w·e^{m_w} / Σ_w n_w): the log Ẑ of all samples of the last W batches, given each
    batch's log Ẑ and size. Entries with n_w = 0 are ignored; all empty -> −inf.
    """
    counts = torch.as_tensor(counts, dtype=log_means.dtype, device=log_means.device).expand_as(log_means)
    tiny = torch.finfo(log_means.dtype).tiny
    terms = torch.where(counts > 0, log_means + torch.log(counts.clamp(min=tiny)), float("-inf"))
    total = counts.sum(-1)
    out = torch.logsumexp(terms, dim=-1) - torch.log(total.clamp(min=tiny))
    return torch.where(total > 0, out, torch.full_like(out, float("-inf")))


def moving_average(
    old: torch.Tensor | float | None, value: torch.Tensor | float, momentum: float
) -> torch.Tensor | float:
    """Exponential moving average: (1 − m)·old + m·value (`value` when `old` is None).

    The moving-average baseline for pseudo-rewards (subtract it from R), or a running statistic.
    """
    if old is None:
        return value
    return (1 - momentum) * old + momentum * value


def log_moving_average(
    log_old: torch.Tensor | None, log_value: torch.Tensor, momentum: float
) -> torch.Tensor:
    """`moving_average` of positive quantities given as logs: log((1 − m)·e^{old} + m·e^{value}).

    E.g. a running Ẑ with exponential forgetting, in log space. m ∈ (0, 1]; `log_value` when
    `log_old` is None.
    """
    if log_old is None or momentum >= 1:
        return log_value
    return torch.logaddexp(log_old + math.log1p(-momentum), log_value + math.log(momentum))


# --------------------------------------------------------------------------------- pseudo-rewards


def _as_log_z(log_z: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(log_z, dtype=like.dtype, device=like.device).detach()


def fkl_pseudo_reward(
    log_target: torch.Tensor,
    log_z: torch.Tensor | float,
    log_policy: torch.Tensor,
    log_proposal: torch.Tensor,
) -> torch.Tensor:
    """Forward KL / DPG `[...]`: R = p(x)/q(x) = exp(log P − log Z − log q).

    ∇_θ KL(p‖π_θ) = −E_q[(P/(Z q))·∇ log π_θ] (Khalifa et al. 2021), so E_q[R ∇log π] = −∇ KL(p‖π).
    `log_policy` is unused (kept for a common signature); pass log_z = 0 for the unnormalised P/q
    of GDC++ (then use `gdcpp_baseline` with log Ẑ). Zero where P = 0.
    """
    del log_policy
    return torch.exp(log_target.detach() - _as_log_z(log_z, log_target) - log_proposal.detach())


def rkl_pseudo_reward(
    log_target: torch.Tensor,
    log_z: torch.Tensor | float,
    log_policy: torch.Tensor,
    log_proposal: torch.Tensor,
) -> torch.Tensor:
    """Reverse KL = KL-regularised RL `[...]`: R = (π/q)·(log P − log Z − log π − 1).

    −f′(π/p) for f(t) = t log t is −log(π/p) − 1, kept whole as in naver/disco's `ReverseKLLoss`.
    The constant −log Z − 1 does not change the expected gradient (E_q[(π/q)·c·∇log π] = c·∇Σπ = 0),
    only its variance, and any baseline of the form b·π/q (`gdc++`, the moving average) absorbs
    it; on-policy (q = π) R + log Z + 1 = r/β − log(π/a), the KL-RL reward over β.
    E_q[R ∇log π] = −∇ KL(π‖p). −inf where P = 0 (KL(π‖p) is infinite there).
    """
    log_policy, log_proposal = log_policy.detach(), log_proposal.detach()
    gap = log_target.detach() - _as_log_z(log_z, log_target) - log_policy - 1.0
    return torch.exp(log_policy - log_proposal) * gap


def js_pseudo_reward(
    log_target: torch.Tensor,
    log_z: torch.Tensor | float,
    log_policy: torch.Tensor,
    log_proposal: torch.Tensor,
) -> torch.Tensor:
    """Jensen–Shannon (f-DPG) `[...]`: R = −(π/q)·(log 2 − softplus(−log(π/p))), log p = log P − log Z.

    D = Σ_x p f(π/p) with f(t) = t log(2t/(1+t)) + log(2/(1+t)), i.e. KL(π‖m) + KL(p‖m) with
    m = (π+p)/2 (Go et al. 2023; twice the ½-weighted JS); −f′(t) = −log(2t/(1+t)).
    E_q[R ∇log π] = −∇D. Bounded by log 2 in absolute value times π/q; finite where P = 0.
    """
    log_policy, log_proposal = log_policy.detach(), log_proposal.detach()
    log_ratio = log_policy - (log_target.detach() - _as_log_z(log_z, log_target))  # log(π/p)
    return -torch.exp(log_policy - log_proposal) * (math.log(2.0) - F.softplus(-log_ratio))


def tv_pseudo_reward(
    log_target: torch.Tensor,
    log_z: torch.Tensor | float,
    log_policy: torch.Tensor,
    log_proposal: torch.Tensor,
) -> torch.Tensor:
    """Total variation (f-DPG) `[...]`: R = −½·(π/q)·sign(log π − log p), log p = log P − log Z.

    D = TV(π, p) = ½ Σ_x |π − p| = Σ_x p f(π/p) with f(t) = ½|t − 1|, f′(t) = ½ sign(t − 1).
    E_q[R ∇log π] = −∇ TV where no π(x) = p(x) (TV is not differentiable there).
    """
    log_policy, log_proposal = log_policy.detach(), log_proposal.detach()
    log_ratio = log_policy - (log_target.detach() - _as_log_z(log_z, log_target))
    return -0.5 * torch.exp(log_policy - log_proposal) * torch.sign(log_ratio)


def pseudo_reward(
    divergence: str,
    log_target: torch.Tensor,
    log_z: torch.Tensor | float,
    log_policy: torch.Tensor,
    log_proposal: torch.Tensor,
) -> torch.Tensor:
    """The pseudo-reward of `divergence` ∈ {fkl, rkl, js, tv} (see the functions above), `[...]`."""
    functions = {
        "fkl": fkl_pseudo_reward,
        "rkl": rkl_pseudo_reward,
        "js": js_pseudo_reward,
        "tv": tv_pseudo_reward,
    }
    if divergence not in functions:
        raise ValueError(f"divergence must be fkl, rkl, js or tv, got {divergence!r}")
    return functions[divergence](log_target, log_z, log_policy, log_proposal)


def f_pseudo_reward(
    divergence: str,
    log_target: torch.Tensor,
    log_z: torch.Tensor | float,
    log_policy: torch.Tensor,
) -> torch.Tensor:
    """r_f = −f′(π/p) `[...]`, the pseudo-reward of naver/disco's f-divergence losses, before the
    importance ratio: `pseudo_reward` = (π/q)·r_f. With log p = log P − log Z:

    fkl p/π; rkl log p − log π − 1; js −(log 2 − softplus(−log(π/p))); tv −½·sign(log π − log p).
    The moving-average baseline averages these values (a baseline of r_f, not of R). Detached.
    """
    log_p = log_target.detach() - _as_log_z(log_z, log_target)
    log_ratio = log_policy.detach() - log_p  # log(π/p)
    if divergence == "fkl":
        return torch.exp(-log_ratio)
    if divergence == "rkl":
        return -log_ratio - 1.0
    if divergence == "js":
        return -(math.log(2.0) - F.softplus(-log_ratio))
    if divergence == "tv":
        return -0.5 * torch.sign(log_ratio)
    raise ValueError(f"divergence must be fkl, rkl, js or tv, got {divergence!r}")


def baselined_advantage(
    reward: torch.Tensor,
    baseline: torch.Tensor | float,
    log_policy: torch.Tensor,
    log_proposal: torch.Tensor,
) -> torch.Tensor:
    """`reward [...]` (a `pseudo_reward`, π/q included) minus the baseline times the importance ratio:

        A = R − b·π/q = (π/q)(r_f − b)

    b is a number per sample (`[...]` or a scalar) that does not depend on the sample itself: the
    GDC++ coefficient c (then b·π/q = c·π/q, Korbak et al. 2022) or a moving average of r_f over
    earlier batches (naver/disco's `FDivergenceLoss`). Unbiased for any such b, also for an
    offline proposal q ≠ π, because E_q[b·(π/q)·∇log π] = b·∇Σ_x π(x) = 0; subtracting b from R
    itself would not be (E_q[b·∇log π] = b·Σ q ∇log π ≠ 0 when q ≠ π). Detached.
    """
    ratio = torch.exp(log_policy.detach() - log_proposal.detach())
    return reward.detach() - torch.as_tensor(baseline, dtype=reward.dtype, device=reward.device) * ratio


def pseudo_reward_loss(
    divergence: str,
    log_target: torch.Tensor,
    log_z: torch.Tensor | float,
    log_policy: torch.Tensor,
    log_proposal: torch.Tensor,
    baseline: torch.Tensor | float = 0.0,
    max_advantage: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The f-DPG surrogate loss over samples `[N]` -> (loss `[]`, advantage `[N]`).

        loss = −mean_i A_i·log π(x_i),  A = `baselined_advantage`(`pseudo_reward`, b) = (π/q)(r_f − b)

    (A = 0 where log Z is not finite: a context with no target mass yet; clipped to ±`max_advantage`,
    biased, when given). `log_policy` carries the gradient; ∇loss = −mean_i A_i ∇log π(x_i), whose
    expectation under q is ∇D(p, π) minus nothing: the baseline term has mean zero. The same
    value and gradient as disco's `FDivergenceLoss.__call__`, mean((π/q)·(−(r_f − b))·log π).
    """
    log_z = torch.as_tensor(log_z, dtype=log_target.dtype, device=log_target.device)
    reward = pseudo_reward(divergence, log_target, log_z, log_policy.detach(), log_proposal)
    advantage = baselined_advantage(reward, baseline, log_policy, log_proposal)
    advantage = torch.where(log_z.isfinite(), advantage, torch.zeros_like(advantage))
    if max_advantage is not None:
        advantage = advantage.clamp(-max_advantage, max_advantage)
    return -(advantage.to(log_policy.dtype) * log_policy).mean(), advantage


def gdcpp_baseline(
    log_z: torch.Tensor | float, log_policy: torch.Tensor, log_proposal: torch.Tensor
) -> torch.Tensor:
    """GDC++ baseline `[...]`: B(x) = Z·π(x)/q(x) (Korbak et al. 2022), detached.

    ∇ ∝ E_q[(P/q − Z·π/q)·∇ log π]: unbiased because E_q[(π/q)·∇log π] = ∇Σπ = 0. Pairs with the
    unnormalised reward P/q (`fkl_pseudo_reward` with log_z = 0); for the normalised p/q pass
    log_z = 0 here (baseline π/q).
    """
    log_policy = log_policy.detach()
    return torch.exp(_as_log_z(log_z, log_policy) + log_policy - log_proposal.detach())


# ------------------------------------------------------------------------------------- estimates


def _log_z_or_estimate(
    log_z: torch.Tensor | float | None, log_target: torch.Tensor, log_proposal: torch.Tensor
) -> torch.Tensor:
    if log_z is None:
        return estimate_log_z(log_target, log_proposal)
    return torch.as_tensor(log_z, dtype=log_target.dtype, device=log_target.device)


def estimate_forward_kl(
    log_target: torch.Tensor,
    log_policy: torch.Tensor,
    log_proposal: torch.Tensor,
    log_z: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """KL(p‖π) by importance sampling, `[..., N]` -> `[...]`.

    KL ≈ −log Z + (1/Z)·mean_q[(P/q)(log P − log π)]; with `log_z=None` Ẑ comes from the same
    samples (self-normalised: Σ_i w̃_i (log P − log π)_i − log Ẑ, consistent), with a given log Z
    it is unbiased. Samples with P = 0 contribute 0.
    """
    log_z = _log_z_or_estimate(log_z, log_target, log_proposal)
    log_w = log_target - log_proposal
    gap = torch.where(torch.isneginf(log_target), torch.zeros_like(log_target), log_target - log_policy)
    return (torch.exp(log_w - log_z.unsqueeze(-1)) * gap).mean(-1) - log_z


def estimate_tv(
    log_target: torch.Tensor,
    log_policy: torch.Tensor,
    log_proposal: torch.Tensor,
    log_z: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """TV(p, π) by importance sampling, `[..., N]` -> `[...]`: ½·mean_q |P/(Z q) − π/q|.

    |e^u − e^v| = e^{max}·(1 − e^{−|u−v|}) in log space; `log_z=None` uses Ẑ from the same samples.
    """
    log_z = _log_z_or_estimate(log_z, log_target, log_proposal)
    u = log_target - log_z.unsqueeze(-1) - log_proposal
    v = log_policy - log_proposal
    high, low = torch.maximum(u, v), torch.minimum(u, v)
    diff = torch.exp(high) * -torch.expm1(low - high)
    diff = torch.where(torch.isneginf(high), torch.zeros_like(diff), diff)
    return 0.5 * diff.mean(-1)


def estimate_kl_policy_base(
    log_policy: torch.Tensor, log_base: torch.Tensor, log_proposal: torch.Tensor
) -> torch.Tensor:
    """KL(π‖a) (forgetting of the base) by importance sampling, `[..., N]` -> `[...]`.

    mean_q[(π/q)(log π − log a)], unbiased; on-policy (q = π) simply mean(log π − log a).
    """
    return (torch.exp(log_policy - log_proposal) * (log_policy - log_base)).mean(-1)


def effective_sample_size(log_weights: torch.Tensor) -> torch.Tensor:
    """ESS of importance weights `[..., N]` -> `[...]`: (Σw)²/Σw² = exp(2·lse(log w) − lse(2·log w)).

    In [1, N]: N for equal weights, 1 when one weight dominates. Invariant to scaling w; log w is
    shifted by its maximum first, so weights of 1000-token sequences (log w ~ −2000) lose no precision.
    nan when every weight is 0.
    """
    peak = log_weights.detach().amax(dim=-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    shifted = log_weights - peak  # maximum 0: no cancellation between the two log-sum-exps
    return torch.exp(2 * torch.logsumexp(shifted, dim=-1) - torch.logsumexp(2 * shifted, dim=-1))


# ------------------------------------------------------------------------- the trainer's estimators


def configured_log_target(
    target: str,
    log_base: torch.Tensor,
    reward: torch.Tensor,
    *,
    beta: float,
    threshold: float,
    features: torch.Tensor | None = None,
    lambdas: torch.Tensor | None = None,
    with_constraint: bool = False,
) -> torch.Tensor:
    """log P(x) `[N]` of a `bayes:` target from log a(x) `[N]`, the combined reward r `[N]` and φ `[N, M]`.

    `tilt`: log a + r/β (`log_target`); `pointwise`: log a + log b with b = 1[r ≥ `threshold`]
    (`pointwise_log_target`); `moments`: log a + λ·φ (`moment_log_target`), on top of log b when
    `with_constraint` (the moments of the constrained distribution a·b).
    """
    if target == "tilt":
        return log_target(log_base, reward, beta)
    if target == "pointwise" or with_constraint:
        log_base = pointwise_log_target(log_base, reward >= threshold)
    if target == "pointwise":
        return log_base
    if target != "moments" or features is None or lambdas is None:
        raise ValueError(f"target {target!r}: tilt, pointwise, or moments with features and lambdas")
    return moment_log_target(log_base, features, lambdas)


def fit_conditional_moment_lambdas(
    features: torch.Tensor,
    log_base_minus_log_proposal: torch.Tensor,
    index: torch.Tensor,
    target_moments: torch.Tensor,
    max_iter: int = 200,
) -> torch.Tensor:
    """λ `[M]` with mean_c Ê_{p_λ(·|c)}[φ] = μ̄ for conditional targets p_λ(x|c) ∝ a(x|c)·exp(λ·φ(x)).

    `features [N, M]`, `log_base_minus_log_proposal [N]`, context `index [N]`, `target_moments [M]`.
    Minimises the convex dual mean_c log Ẑ_c(λ) − λ·μ̄ (its gradient is the mean over contexts of the
    self-normalised moments minus μ̄) with L-BFGS in float64; contexts without any sample of positive
    weight are left out. One context reduces to `fit_moment_lambdas`.
    """
    phi = features.double()
    log_w0 = log_base_minus_log_proposal.double()
    mu = torch.as_tensor(target_moments, dtype=torch.float64).reshape(-1)
    num = int(index.max()) + 1
    has_mass = group_log_mean_exp(log_w0, index, num).isfinite()
    lam = torch.zeros(phi.shape[-1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [lam],
        lr=1,
        max_iter=max_iter,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        shifted = torch.where(log_w0.isfinite(), log_w0 + phi @ lam, log_w0)
        dual = group_log_mean_exp(shifted, index, num)[has_mass].mean() - lam @ mu
        dual.backward()
        return dual

    optimizer.step(closure)
    return lam.detach()


def gdcpp_coefficient(divergence: str, reward: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """The GDC++ baseline's c = E_π[r_f] per context, `reward [..., N]`, `ratio [..., N]` -> `[...]`.

    `reward` is the pseudo-reward R = (π/q)·r_f of a context's N samples x_i ~ q and `ratio` their π/q;
    c = Σ_i R_i / Σ_i (π/q)_i is the self-normalised IS estimate of E_π[r_f], and the baseline enters
    the advantage as c·π/q (`baselined_advantage`). For fkl r_f = p/π and E_π[p/π] = 1 exactly, so
    c = 1 (Korbak et al. 2022's Z·π/q in units of p/q).
    """
    if divergence == "fkl":
        return torch.ones(reward.shape[:-1], dtype=torch.float64)
    return reward.sum(-1) / ratio.sum(-1)


def windowed_mean(window: list[float], values: list[float], size: int) -> tuple[list[float], float | None]:
    """naver/disco's windowed moving average: (the last `size` of `window + values`, their mean).

    The moving-average baseline b of r_f: the trainer uses the mean of the window *before* a batch
    joins it (None while the window is empty), so b never depends on the samples it multiplies.
    """
    kept = (window + values)[-size:]
    return kept, (sum(kept) / len(kept) if kept else None)


def add_log_z_estimates(
    history: dict[str, list[tuple[float, float]]],
    entries: list[tuple[str, float, float]],
    window: int = 0,
) -> None:
    """Add batch estimates (key, log Ẑ, sample count) to the running per-key `history`, in place.

    Estimates of one key from one call are pooled into one entry (`pool_log_means`: the log Ẑ of their
    samples together). `window` > 0 keeps the key's last `window` entries (a windowed Ẑ); 0 pools the
    whole history into one entry (every sample so far). `pooled_log_z` reads a key's estimate.
    """
    merged: dict[str, list[tuple[float, float]]] = {}
    for key, value, count in entries:
        merged.setdefault(key, []).append((value, count))
    for key, parts in merged.items():
        if len(parts) > 1:
            parts = [(float(pooled_log_z(parts)), float(sum(n for _, n in parts)))]
        kept = history.setdefault(key, [])
        kept.append(parts[0])
        if window:
            del kept[:-window]
        elif len(kept) > 1:
            kept[:] = [(float(pooled_log_z(kept)), sum(n for _, n in kept))]


def pooled_log_z(history: list[tuple[float, float]]) -> torch.Tensor:
    """log Ẑ `[]` (float64) of (log Ẑ, sample count) entries pooled (`pool_log_means`)."""
    return pool_log_means(
        torch.tensor([v for v, _ in history], dtype=torch.float64),
        torch.tensor([n for _, n in history], dtype=torch.float64),
    )
