"""GFlowNet balance losses for autoregressive generation: TB, DB, SubTB(λ), modified SubTB, FL-DB.

Conventions (one sequence per row; see `docs/methods/gflownet.md`):

- States are prefixes. s_0 is the empty prefix (the prompt), s_t the prefix of the first t
  generated tokens. The state graph is a tree, so every state has one parent: P_B = 1 and
  log P_B never appears.
- `log_pf [B, T]`: log P_F(s_{t+1} | s_t), the log-probability of generated token t given the
  prefix before it.
- `mask [B, T]`: 1 for the n real transitions of a row (a prefix of the row: n = Σ_t mask_t),
  0 after them (after the first EOS, padding). Masked positions may hold anything, even ±inf
  or NaN: they are selected away before any arithmetic that could carry them into a value or
  a gradient.
- `log_flow [B, T + 1]`: log F(s_t) for the states s_0 .. s_T. Only s_0 .. s_n are read. The
  last valid state s_n is the terminal state, and **the caller puts log R(x) there**
  (F(x) = R(x) for a terminal x); `set_terminal_log_flow` writes it at the right position of
  each row. With an explicit stop token counted as a transition, s_n = x⊤ is the completed
  sequence; without one, s_n is the last prefix, taken as terminal.
- Per-sequence losses return `[B]`; per-transition losses return `[B, T]` (0 where masked).
  Reductions over the batch are the caller's choice.
- Pair weights of SubTB(λ) are λ^{j−i−1} (Hu et al.'s form; λ^{j−i} differs by the factor λ,
  which every normalisation below cancels), so that λ = 0 is exact (only length-1
  subtrajectories, i.e. mean DB); they are computed in log space, so large λ does not overflow.
  Two normalisations (`NORMALIZATIONS`), named after their sources:
  `sequence` divides each row's weighted sum by its own Σ λ^{j−i−1} (torchgfn's
  `geometric_within`, the SubTB paper's library: every sequence weighs the same);
  `gfn-lm-tuning` divides by the mean Σ λ^{j−i−1} over the rows of the batch (or of each
  `group`), so that the mean of the returned rows is Σ_rows Σ_pairs λ^{j−i−1}(…)² / Σ_rows Σ_pairs
  λ^{j−i−1}, `modified_subtb_loss` of GFNOrg/gfn-lm-tuning: every sequence weighs by its pairs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from reasoning.objectives.bayes import group_log_mean_exp

NORMALIZATIONS = ("sequence", "gfn-lm-tuning")
SCHEDULES = ("constant", "linear", "cosine")


def mask_after_eos(ids: torch.Tensor, eos_id: int, include_eos: bool = True) -> torch.Tensor:
    """Transition mask `[B, T]` from generated ids `[B, T]`: 1 up to the first `eos_id`, 0 after.

    m_t = 1[no EOS strictly before t] (with `include_eos`, the EOS transition itself counts), or
    1[no EOS at or before t] (without: only the tokens of the trace, as modified SubTB wants).
    Rows without EOS are all ones.
    """
    is_eos = (ids == eos_id).long()
    seen = is_eos.cumsum(dim=-1)
    if include_eos:
        seen = seen - is_eos
    return (seen == 0).to(torch.float32)


def _lengths(mask: torch.Tensor) -> torch.Tensor:
    return mask.to(torch.long).sum(dim=-1)


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def set_terminal_log_flow(
    log_flow: torch.Tensor, mask: torch.Tensor, log_reward: torch.Tensor
) -> torch.Tensor:
    """Copy of `log_flow [B, T+1]` with position n_b = Σ_t mask_bt replaced by `log_reward [B]`.

    log F(s_n) := log R(x), the terminal convention of `subtrajectory_balance` and
    `detailed_balance`. For `forward_looking_detailed_balance` pass log R(x) − Σ_t r_t (0 when the
    reward is exactly the sum of the step rewards). Differentiable in both inputs.
    """
    index = _lengths(mask).unsqueeze(-1)
    return log_flow.scatter(-1, index, log_reward.to(log_flow.dtype).unsqueeze(-1))


def trajectory_balance(
    log_z: torch.Tensor | float, log_pf: torch.Tensor, mask: torch.Tensor, log_reward: torch.Tensor
) -> torch.Tensor:
    """Trajectory balance `(log_z [] or [B], log_pf [B, T], mask [B, T], log_reward [B]) -> [B]`.

    TB(x) = (log Z + Σ_t m_t log P_F(s_{t+1}|s_t) − log R(x))²  with P_B = 1 (Malkin et al., 2022).
    `log_z` is a learned scalar or a per-prompt value (prompt-conditioned head).
    """
    log_p_traj = _masked(log_pf, mask).sum(dim=-1)
    return (log_z + log_p_traj - log_reward) ** 2


def detailed_balance(log_flow: torch.Tensor, log_pf: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Detailed balance per transition `(log_flow [B, T+1], log_pf [B, T], mask [B, T]) -> [B, T]`.

    DB_t = m_t (log F(s_t) + log P_F(s_{t+1}|s_t) − log F(s_{t+1}))² with P_B = 1; the flow at the
    last valid state s_n is log R(x) (see `set_terminal_log_flow`). 0 at masked transitions.
    """
    residual = log_flow[..., :-1] + log_pf - log_flow[..., 1:]
    return _masked(residual, mask) ** 2


def forward_looking_detailed_balance(
    log_flow: torch.Tensor, log_pf: torch.Tensor, mask: torch.Tensor, step_log_reward: torch.Tensor
) -> torch.Tensor:
    """Forward-looking DB per transition (Pan et al., 2023) `(.. [B, T+1], [B, T], [B, T], [B, T]) -> [B, T]`.

    For rewards that add up along the trajectory, log R(x) = Σ_t r_t with r_t = log-reward
    increment of step s_t → s_{t+1} (an energy decrease: r_t = −(E(s_{t+1}) − E(s_t)), E(s_0) = 0),
    the flow is parameterised as log F(s_t) = log F̃(s_t) + Σ_{k<t} r_k  (F = F̃·exp(−E)), and DB
    log F(s_t) + log P_F − log F(s_{t+1}) = 0 becomes

        FL-DB_t = m_t (log F̃(s_t) + log P_F(s_{t+1}|s_t) − log F̃(s_{t+1}) − r_t)²

    Sign: r_t > 0 is reward gained by the step (= −ΔE); F̃(s_t)·P_F = F̃(s_{t+1})·exp(r_t).
    `log_flow` here holds log F̃ (the "forward-looking" flow: reward still to come); at the
    terminal state the caller puts log R(x) − Σ_t r_t, which is 0 when the reward is fully
    additive. Every transition gets its own credit r_t, and incomplete trajectories can be
    trained on.
    """
    residual = log_flow[..., :-1] + log_pf - log_flow[..., 1:] - step_log_reward
    return _masked(residual, mask) ** 2


def _pair_log_weights(lengths: torch.Tensor, size: int, lam: torch.Tensor | float) -> torch.Tensor:
    """Unnormalised log SubTB(λ) weights `[B, T+1, T+1]` (float64): log λ^{j−i−1} for 0 ≤ i < j ≤ n_b, −inf elsewhere."""
    device = lengths.device
    positions = torch.arange(size, device=device)
    i, j = positions.view(-1, 1), positions.view(1, -1)
    pairs = (i < j) & (j <= lengths.view(-1, 1, 1))  # [B, T+1, T+1]
    lam = torch.as_tensor(lam, dtype=torch.float64, device=device).detach()
    if (lam < 0).any():
        raise ValueError(f"lam must be >= 0, got {lam}")
    exponent = (j - i - 1).clamp(min=0).to(torch.float64)
    log_lam = torch.log(lam) if lam.dim() == 0 else torch.log(lam).view(-1, 1, 1)
    # λ^0 = 1 also for λ = 0 (where 0·log 0 would be NaN)
    log_w = torch.where(
        exponent == 0, torch.zeros((), dtype=torch.float64, device=device), exponent * log_lam
    )
    return log_w.expand(pairs.shape).masked_fill(~pairs, -math.inf)


def subtb_log_normalizer(
    mask: torch.Tensor,
    lam: torch.Tensor | float = 1.0,
    normalization: str = "sequence",
    group: torch.Tensor | None = None,
) -> torch.Tensor:
    """log of the divisor of each row's weighted SubTB sum, `mask [B, T]` -> `[B]` (float64).

    With W_b = Σ_{0≤i<j≤n_b} λ^{j−i−1} (n_b = Σ_t mask_bt): `sequence` gives log W_b;
    `gfn-lm-tuning` gives log mean_{b′} W_{b′} over the rows b′ of b's group (`group [B]`, any
    integer ids; None: the whole batch is one group). −inf where there is no pair to weigh. Depends
    only on the lengths and λ, so a trainer can compute it for a whole generation batch and pass
    it (`log_normalizer`) to micro-batches that split a group.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}")
    log_total = torch.logsumexp(_pair_log_weights(_lengths(mask), mask.shape[-1] + 1, lam).flatten(1), dim=-1)
    if normalization == "sequence":
        return log_total
    if group is None:
        return torch.logsumexp(log_total, dim=0).expand_as(log_total) - math.log(log_total.shape[0])
    _, index = torch.unique(group.to(log_total.device), return_inverse=True)
    return group_log_mean_exp(log_total, index)[index]


def subtrajectory_balance(
    log_flow: torch.Tensor,
    log_pf: torch.Tensor,
    mask: torch.Tensor,
    lam: torch.Tensor | float = 1.0,
    normalization: str = "sequence",
    log_normalizer: torch.Tensor | None = None,
    group: torch.Tensor | None = None,
) -> torch.Tensor:
    """SubTB(λ) per sequence (Madan et al., 2023) `(log_flow [B, T+1], log_pf [B, T], mask [B, T]) -> [B]`.

        SubTB(x_b) = Σ_{0≤i<j≤n} λ^{j−i−1} (log F(s_i) + Σ_{i≤t<j} log P_F(s_{t+1}|s_t) − log F(s_j))² / D_b

    with n = Σ_t mask_t and log F(s_n) = log R(x) supplied by the caller (`set_terminal_log_flow`).
    D_b = exp(`log_normalizer`), by default `subtb_log_normalizer(mask, lam, normalization, group)`:
    `sequence` (default; torchgfn's geometric_within) D_b = Σ_{i<j} λ^{j−i−1} of the row itself;
    `gfn-lm-tuning` D_b = the mean of that sum over the rows of the group, so the mean of the
    returned rows is the ratio of the batch's weighted sum to its total weight.
    `lam` is a float or a `[B]` tensor, λ ≥ 0 (λ = 0: mean DB over the n transitions; λ → ∞: the
    full-trajectory term (log F(s_0) + Σ_t log P_F − log R)², TB with log Z = log F(s_0)).
    Vectorised: prefix sums C_k = Σ_{t<k} log P_F give every subtrajectory's log-probability as
    C_j − C_i, and an [T+1, T+1] pair mask selects 0 ≤ i < j ≤ n. Rows with n = 0 give 0.
    Memory O(B·T²).
    """
    lengths = _lengths(mask)
    size = log_pf.shape[-1] + 1
    if log_flow.shape[-1] != size:
        raise ValueError(f"log_flow needs T+1 = {size} positions, got {log_flow.shape[-1]}")
    zero = torch.zeros_like(log_pf[..., :1])
    prefix = torch.cat([zero, _masked(log_pf, mask)], dim=-1).cumsum(dim=-1)  # C_k, [B, T+1]
    states = torch.arange(size, device=log_pf.device) <= lengths.unsqueeze(-1)  # s_0..s_n
    flow = _masked(log_flow, states)
    # residual[b, i, j] = log F(s_i) − C_i + C_j − log F(s_j)
    start = (flow - prefix).unsqueeze(-1)
    end = (prefix - flow).unsqueeze(-2)
    if log_normalizer is None:
        log_normalizer = subtb_log_normalizer(mask, lam, normalization, group)
    log_normalizer = log_normalizer.to(device=log_pf.device, dtype=torch.float64).view(-1, 1, 1)
    log_w = _pair_log_weights(lengths, size, lam) - log_normalizer
    pairs = torch.isfinite(log_w)  # also 0 where the normaliser is −inf (no pair in the group)
    weights = torch.exp(torch.where(pairs, log_w, torch.full_like(log_w, -math.inf))).to(log_pf.dtype)
    residual = _masked(start + end, pairs)
    return (weights * residual**2).sum(dim=(-2, -1))


def modified_subtrajectory_balance(
    log_pf: torch.Tensor,
    log_terminal: torch.Tensor,
    mask: torch.Tensor,
    log_reward: torch.Tensor,
    lam: torch.Tensor | float = 1.0,
    normalization: str = "gfn-lm-tuning",
    log_normalizer: torch.Tensor | None = None,
    group: torch.Tensor | None = None,
) -> torch.Tensor:
    """Modified SubTB of Hu et al. (2024), every prefix terminable, no flow network and no log Z.

    Shapes: `log_pf [B, T]` = log P_F(z_{k+1}|s_k) for the n trace tokens (the stop token is
    *not* one of them: `mask [B, T]` marks only z_1..z_n, e.g. `mask_after_eos(ids, eos,
    include_eos=False)`), `log_terminal [B, T+1]` = log P_F(⊤|s_k), the log-probability of
    stopping (EOS) right after prefix s_k, k = 0..T, and `log_reward [B, T+1]` = log R(s_k⊤), the
    log-reward of the sequence stopped after prefix s_k. Returns `[B]`.

    The flow of a prefix is implied by its own termination: F(s_k) = R(s_k⊤) / P_F(⊤|s_k). Per step

        δ_k = log R(s_k⊤) + log P_F(z_{k+1}|s_k) + log P_F(⊤|s_{k+1}) − log R(s_{k+1}⊤) − log P_F(⊤|s_k)

    and row b is Σ_{0≤i<j≤n} λ^{j−i−1} (Σ_{i≤k<j} δ_k)² / D_b (λ = 1 in the paper). This is
    `subtrajectory_balance` with log F(s_k) = log R(s_k⊤) − log P_F(⊤|s_k). The default
    normalisation is the reference code's, `gfn-lm-tuning`: D_b = the mean over the batch (or
    `group`) of the rows' Σ λ^{j−i−1}, so that `.mean()` of the rows is `modified_subtb_loss`,
    Σ_b Σ_pairs λ^{j−i−1}(…)² / Σ_b Σ_pairs λ^{j−i−1}: long traces, with more pairs, weigh more.
    `sequence` normalises each row by its own Σ λ^{j−i−1}. At the zero, P_F(z⊤) ∝ R(z⊤) over all
    terminated sequences, either way. Rows with n = 0 give 0.
    """
    return subtrajectory_balance(
        log_reward - log_terminal, log_pf, mask, lam, normalization, log_normalizer, group
    )


# ---------------------------------------------------------------------- reward tempering and heads
def reward_temperature_at(
    step: int, start: float, end: float | None, steps: int | None, schedule: str
) -> float:
    """The reward temperature T_R at `step`: `start` → `end` over `steps` steps, then `end`.

    With u = min(step/steps, 1): `linear` T_0 + (T_1 − T_0)·u; `cosine` T_1 + (T_0 − T_1)·(1 + cos πu)/2.
    `constant`, `end=None` or `steps` ≤ 0 give `start`. A balance loss on log R/T_R targets
    P_F(x⊤) ∝ R(x⊤)^{1/T_R}.
    """
    if schedule == "constant" or end is None or not steps or steps <= 0:
        return float(start)
    u = min(max(step, 0) / steps, 1.0)
    if schedule == "linear":
        return float(start + (end - start) * u)
    if schedule == "cosine":
        return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * u)))
    raise ValueError(f"unknown reward temperature schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")


class ScalarLogZ(nn.Module):
    """A learned scalar log Z, the same for every prompt: `features [..., H] -> [...]`."""

    def __init__(self, init: float = 0.0) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.tensor(float(init)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.value.expand(features.shape[:-1])


class MLPHead(nn.Module):
    """A log Z(x) or log F(s) head, `features [..., H] -> [...]`: W₂ GELU(W₁ h + b₁) + b₂ in float32.

    The last layer is zero-initialised with bias `init`, so the head starts at `init` for every
    input (log Z = `log_z_init`) and learns the dependence on the state from there.
    """

    def __init__(self, hidden_size: int, width: int = 64, init: float = 0.0) -> None:
        super().__init__()
        self.inner = nn.Linear(hidden_size, width)
        self.outer = nn.Linear(width, 1)
        nn.init.zeros_(self.outer.weight)
        nn.init.constant_(self.outer.bias, float(init))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.outer(nn.functional.gelu(self.inner(features.float()))).squeeze(-1)


def balance_heads(
    loss: str, log_z: str, hidden_size: int, width: int = 64, init: float = 0.0
) -> nn.ModuleDict:
    """The learned heads a balance loss needs: `log_z` for `tb` (`ScalarLogZ`, or an `MLPHead` on the
    prompt's last hidden state when `log_z` is "prompt"), `flow` (an `MLPHead` on the hidden state after
    each prefix) for `subtb` / `db`, none for `modified_subtb` (its flows are implied by P_F(⊤|s))."""
    heads: dict[str, nn.Module] = {}
    if loss == "tb":
        heads["log_z"] = ScalarLogZ(init) if log_z == "scalar" else MLPHead(hidden_size, width, init)
    elif loss in ("subtb", "db"):
        heads["flow"] = MLPHead(hidden_size, width, init)
    return nn.ModuleDict(heads)


def group_variances(groups: list[int], values: list[float]) -> float | None:
    """The mean over groups (of two or more values) of the unbiased variance of `values` within each
    group; None when no group has two. With values log R(x) − log P_F(x) of one prompt's samples this
    is 0 exactly when the sampler is calibrated, P_F(x⊤) ∝ R(x⊤) (TB's log Z(x) is then the constant)."""
    by_group: dict[int, list[float]] = {}
    for group, value in zip(groups, values, strict=True):
        by_group.setdefault(group, []).append(value)
    variances = [torch.tensor(v).var().item() for v in by_group.values() if len(v) > 1]
    return sum(variances) / len(variances) if variances else None
