"""GFlowNet balance losses against exact enumeration of toy autoregressive spaces.

Two toys: `toy.py`'s 27 sequences of length 3 over 3 tokens, and an EOS toy (below) whose
terminal objects are the 40 traces of length 0..3 over 3 tokens followed by EOS, so that rows
have varying lengths and every prefix is terminable (the modified-SubTB setting).
"""

import itertools
import math

import pytest
import torch
from toy import NUM_PREFIXES, SEQUENCES, prefix_index, token_logprobs

from reasoning.objectives.gflownet import (
    MLPHead,
    ScalarLogZ,
    balance_heads,
    detailed_balance,
    forward_looking_detailed_balance,
    group_variances,
    mask_after_eos,
    modified_subtrajectory_balance,
    reward_temperature_at,
    set_terminal_log_flow,
    subtb_log_normalizer,
    subtrajectory_balance,
    trajectory_balance,
)

# --- the EOS toy -----------------------------------------------------------------------------

TOKENS, EOS, MAX_TRACE = 3, 3, 3
TRACES = [t for n in range(MAX_TRACE + 1) for t in itertools.product(range(TOKENS), repeat=n)]
STATE = {trace: index for index, trace in enumerate(TRACES)}  # prefix -> state index (= its x⊤)
N = len(TRACES)  # 40 prefixes, 40 terminal objects
T = MAX_TRACE + 1  # transitions per row, EOS included
LENGTHS = torch.tensor([len(t) for t in TRACES])  # trace lengths n, 0..3
IDS = torch.tensor([list(t) + [EOS] * (T - len(t)) for t in TRACES])  # [N, T], EOS then EOS padding
# state index of s_k for k = 0..T (past the end: the last trace prefix, harmless because masked)
STATES = torch.tensor([[STATE[t[: min(k, len(t))]] for k in range(T + 1)] for t in TRACES])
LEGAL = torch.zeros(N, TOKENS + 1)
LEGAL[LENGTHS == MAX_TRACE, :TOKENS] = -math.inf  # full-length traces must stop
FULL_MASK = mask_after_eos(IDS, EOS).double()  # n + 1 transitions: the trace and its EOS
TRACE_MASK = mask_after_eos(IDS, EOS, include_eos=False)[:, :MAX_TRACE].double()  # n trace tokens


def log_policy(logits):
    """log P_F(a | s) for every state: [N, V+1], illegal actions at -inf."""
    return torch.log_softmax(logits + LEGAL.to(logits.dtype), dim=-1)


def rollout_terms(logits):
    """Per-row pieces: log_pf [N, T] (trace and EOS), log P_F(⊤|s_k) [N, T]."""
    logp = log_policy(logits)
    log_pf = logp[STATES[:, :T], IDS]
    log_terminal = logp[STATES[:, :T], EOS]
    return log_pf, log_terminal


def log_flows(log_reward):
    """Exact log F(s) = log Σ_{x ⊒ s} R(x) over terminal objects x extending s (itself included): [N]."""
    below = torch.tensor([[float(x[: len(s)] == s) for x in TRACES] for s in TRACES], dtype=log_reward.dtype)
    return torch.logsumexp(log_reward + torch.log(below), dim=-1)


def optimal_logits(log_reward):
    """P_F(a|s) = F(sa)/F(s), P_F(⊤|s) = R(s⊤)/F(s): logits log F(sa) and log R(s⊤)."""
    flow = log_flows(log_reward)
    logits = torch.full((N, TOKENS + 1), -math.inf, dtype=log_reward.dtype)
    for s, index in STATE.items():
        logits[index, EOS] = log_reward[index]
        if len(s) < MAX_TRACE:
            for a in range(TOKENS):
                logits[index, a] = flow[STATE[s + (a,)]]
    return torch.where(torch.isinf(logits), torch.zeros_like(logits), logits), flow


def rewards(seed):
    return torch.randn(N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def row_log_flow(flow_per_state, log_reward):
    """log F(s_k) along each row, k = 0..T, with log R(x) at the terminal state s_{n+1} = x⊤."""
    return set_terminal_log_flow(flow_per_state[STATES], FULL_MASK, log_reward)


# --- naive references: double loops over positions -------------------------------------------


def naive_subtb(log_flow, log_pf, mask, lam):
    losses = []
    for b in range(log_pf.shape[0]):
        n = int(mask[b].sum())
        total, norm = log_pf.new_zeros(()), 0.0
        for i in range(n):
            for j in range(i + 1, n + 1):
                residual = log_flow[b, i] + sum(log_pf[b, t] for t in range(i, j)) - log_flow[b, j]
                total = total + lam ** (j - i) * residual**2
                norm += lam ** (j - i)
        losses.append(total / norm if norm else total)
    return torch.stack(losses)


def naive_modified_subtb(log_pf, log_terminal, mask, log_reward, lam, normalization="sequence"):
    """Hu et al.'s form: δ_k, then Σ_{i<j} λ^{j−i−1}(Σ_{k=i}^{j−1} δ_k)², divided by the row's own
    Σ λ^{j−i−1} (`sequence`) or by the mean of that sum over the rows (`gfn-lm-tuning`)."""
    losses, norms = [], []
    for b in range(log_pf.shape[0]):
        n = int(mask[b].sum())
        delta = [
            log_reward[b, k]
            + log_pf[b, k]
            + log_terminal[b, k + 1]
            - log_reward[b, k + 1]
            - log_terminal[b, k]
            for k in range(n)
        ]
        total, norm = log_pf.new_zeros(()), 0.0
        for i in range(n):
            for j in range(i + 1, n + 1):
                total = total + lam ** (j - i - 1) * sum(delta[i:j]) ** 2
                norm += lam ** (j - i - 1)
        losses.append(total)
        norms.append(norm)
    if normalization == "gfn-lm-tuning":
        norms = [sum(norms) / len(norms)] * len(norms)
    return torch.stack([total / norm if norm else total for total, norm in zip(losses, norms)])


def naive_db(log_flow, log_pf, mask, step=None):
    out = torch.zeros_like(log_pf)
    for b in range(log_pf.shape[0]):
        for t in range(int(mask[b].sum())):
            extra = 0.0 if step is None else step[b, t]
            out[b, t] = (log_flow[b, t] + log_pf[b, t] - log_flow[b, t + 1] - extra) ** 2
    return out


def random_batch(seed, batch=7, length=5):
    """Random float64 leaves with rows of every length 0..length; padding holds garbage (±inf, NaN)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.arange(batch) % (length + 1)
    mask = (torch.arange(length) < lengths.unsqueeze(-1)).double()
    states = torch.arange(length + 1) <= lengths.unsqueeze(-1)

    def leaf(shape, keep, garbage):
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        return torch.where(keep.bool(), x, torch.full_like(x, garbage)).requires_grad_(True)

    log_pf = leaf((batch, length), mask, -math.inf)
    log_flow = leaf((batch, length + 1), states, math.nan)
    log_terminal = leaf((batch, length + 1), states, -math.inf)
    log_reward = leaf((batch, length + 1), states, math.nan)
    step = leaf((batch, length), mask, math.inf)
    return mask, log_pf, log_flow, log_terminal, log_reward, step


def grads(value, leaves):
    return torch.autograd.grad(
        value.sum(), leaves, allow_unused=True, materialize_grads=True, retain_graph=True
    )


# --- (1) the optimum -------------------------------------------------------------------------


def test_mask_after_eos():
    ids = torch.tensor([[5, 3, 3, 1], [3, 2, 2, 2], [1, 1, 1, 1]])
    assert mask_after_eos(ids, 3).tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert mask_after_eos(ids, 3, include_eos=False).tolist() == [[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]
    assert FULL_MASK.sum(-1).tolist() == (LENGTHS + 1).tolist()


def test_fixed_length_toy_optimum_zeroes_tb_subtb_db():
    """toy.py: 27 sequences of length 3; flows by scatter over prefix indices."""
    log_reward = torch.randn(len(SEQUENCES), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    index = prefix_index(SEQUENCES)  # [27, 3]
    flow = torch.zeros(NUM_PREFIXES, dtype=torch.float64)
    flow = flow.index_add(0, index.flatten(), log_reward.exp().repeat_interleave(3)).log()
    child = torch.cat([index[:, 1:], torch.full((len(SEQUENCES), 1), -1)], dim=1)
    child_flow = torch.where(child >= 0, flow[child.clamp(min=0)], log_reward.unsqueeze(-1))
    logits = torch.zeros(NUM_PREFIXES, 3, dtype=torch.float64).index_put((index, SEQUENCES), child_flow)
    log_pf = token_logprobs(logits, SEQUENCES)
    mask = torch.ones_like(log_pf)
    log_z = torch.logsumexp(log_reward, 0)
    assert torch.allclose(log_pf.sum(-1).exp(), (log_reward - log_z).exp(), atol=1e-12)
    log_flow = torch.cat([flow[index], log_reward.unsqueeze(-1)], dim=1)  # [27, 4]
    assert trajectory_balance(log_z, log_pf, mask, log_reward).max() < 1e-20
    assert subtrajectory_balance(log_flow, log_pf, mask, 0.9).max() < 1e-20
    assert detailed_balance(log_flow, log_pf, mask).max() < 1e-20
    assert trajectory_balance(log_z + 0.1, log_pf, mask, log_reward).min() == pytest.approx(0.01)


def test_eos_toy_optimum_zeroes_every_loss_and_samples_proportionally_to_reward():
    log_reward = rewards(1)
    logits, flow = optimal_logits(log_reward)
    log_pf, log_terminal = rollout_terms(logits)
    log_z = torch.logsumexp(log_reward, 0)
    # the policy's distribution over the 40 terminal objects is R / Z
    terminal = (log_pf * FULL_MASK).sum(-1).exp()
    assert terminal.sum() == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(terminal, (log_reward - log_z).exp(), atol=1e-12)
    assert flow[STATE[()]] == pytest.approx(log_z.item(), abs=1e-12)

    log_flow = row_log_flow(flow, log_reward)
    assert trajectory_balance(log_z, log_pf, FULL_MASK, log_reward).max() < 1e-20
    for lam in (0.0, 0.5, 1.0, 3.0):
        assert subtrajectory_balance(log_flow, log_pf, FULL_MASK, lam).max() < 1e-20
    assert detailed_balance(log_flow, log_pf, FULL_MASK).max() < 1e-20
    # modified SubTB: trace tokens only, log R of every prefix stopped there
    prefix_reward = log_reward[STATES[:, : MAX_TRACE + 1]]
    trace_pf = log_pf[:, :MAX_TRACE]
    assert modified_subtrajectory_balance(trace_pf, log_terminal, TRACE_MASK, prefix_reward).max() < 1e-20

    # away from the optimum every loss is positive on some row (rows with ≥ 2 trace tokens for
    # modified SubTB, whose pairs need one trace step)
    bad_pf, bad_terminal = rollout_terms(logits + 0.3 * torch.randn(N, TOKENS + 1, dtype=torch.float64))
    assert trajectory_balance(log_z, bad_pf, FULL_MASK, log_reward).max() > 1e-3
    assert subtrajectory_balance(log_flow, bad_pf, FULL_MASK, 0.9).max() > 1e-3
    assert detailed_balance(log_flow, bad_pf, FULL_MASK).max() > 1e-3
    bad = modified_subtrajectory_balance(bad_pf[:, :MAX_TRACE], bad_terminal, TRACE_MASK, prefix_reward)
    assert (bad[LENGTHS >= 1] > 1e-6).all() and (bad[LENGTHS == 0] == 0).all()


def test_forward_looking_db_optimum_with_additive_reward():
    g = torch.Generator().manual_seed(2)
    step_table = torch.randn(N, TOKENS + 1, generator=g, dtype=torch.float64)  # r(s, a)
    step = step_table[STATES[:, :T], IDS] * FULL_MASK  # r_t along each row
    log_reward = step.sum(-1)  # log R(x) = Σ_t r_t, EOS step included
    logits, flow = optimal_logits(log_reward)
    log_pf, _ = rollout_terms(logits)
    # F̃(s_k) = F(s_k) · exp(−Σ_{t<k} r_t), and F̃ = 1 at the terminal state
    gained = torch.cat([torch.zeros(N, 1, dtype=torch.float64), step.cumsum(-1)], dim=1)
    forward_flow = set_terminal_log_flow(
        flow[STATES] - gained, FULL_MASK, torch.zeros(N, dtype=torch.float64)
    )
    assert forward_looking_detailed_balance(forward_flow, log_pf, FULL_MASK, step).max() < 1e-20
    # it is DB under log F = log F̃ + Σ_{t<k} r_t, on any (non-optimal) parameters
    noisy_flow = forward_flow + torch.randn(N, T + 1, generator=g, dtype=torch.float64)
    noisy_pf, _ = rollout_terms(torch.randn(N, TOKENS + 1, generator=g, dtype=torch.float64))
    fl = forward_looking_detailed_balance(noisy_flow, noisy_pf, FULL_MASK, step)
    assert fl.max() > 1e-2
    assert torch.allclose(fl, detailed_balance(noisy_flow + gained, noisy_pf, FULL_MASK), atol=1e-12)


# --- (2) vectorised == naive double loop, values and gradients --------------------------------


@pytest.mark.parametrize("lam", [0.3, 1.0, 2.5])
def test_subtb_matches_naive_double_loop(lam):
    mask, log_pf, log_flow, *_ = random_batch(3)
    ours = subtrajectory_balance(log_flow, log_pf, mask, lam)
    naive = naive_subtb(log_flow, log_pf, mask, lam)
    assert torch.isfinite(ours).all() and ours[mask.sum(-1) > 0].min() > 0
    assert torch.allclose(ours, naive, atol=1e-10)
    for a, b in zip(grads(ours, [log_flow, log_pf]), grads(naive, [log_flow, log_pf])):
        assert torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-6)
        assert a.abs().max() > 0


@pytest.mark.parametrize("normalization", ["sequence", "gfn-lm-tuning"])
@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0, 2.5])
def test_modified_subtb_matches_hu_et_al_double_loop(lam, normalization):
    mask, log_pf, _, log_terminal, log_reward, _ = random_batch(3)
    leaves = [log_pf, log_terminal, log_reward]
    ours = modified_subtrajectory_balance(log_pf, log_terminal, mask, log_reward, lam, normalization)
    naive = naive_modified_subtb(log_pf, log_terminal, mask, log_reward, lam, normalization)
    assert torch.allclose(ours, naive, atol=1e-10)
    for a, b in zip(grads(ours, leaves), grads(naive, leaves)):
        assert torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-6)


def test_tb_db_fldb_match_naive_loops_on_the_eos_toy():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(N, TOKENS + 1, generator=g, dtype=torch.float64, requires_grad=True)
    flow = torch.randn(N, generator=g, dtype=torch.float64, requires_grad=True)
    log_z = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    step = torch.randn(N, T, generator=g, dtype=torch.float64, requires_grad=True)
    log_reward = rewards(5)
    log_pf, _ = rollout_terms(logits)
    log_flow = row_log_flow(flow, log_reward)
    leaves = [logits, flow, log_z, step]

    tb = trajectory_balance(log_z, log_pf, FULL_MASK, log_reward)
    naive_tb = torch.stack(
        [(log_z + log_pf[b, : int(LENGTHS[b]) + 1].sum() - log_reward[b]) ** 2 for b in range(N)]
    )
    db = detailed_balance(log_flow, log_pf, FULL_MASK)
    fl = forward_looking_detailed_balance(log_flow, log_pf, FULL_MASK, step)
    subtb = subtrajectory_balance(log_flow, log_pf, FULL_MASK, 0.7)
    pairs = [
        (tb, naive_tb),
        (db, naive_db(log_flow, log_pf, FULL_MASK)),
        (fl, naive_db(log_flow, log_pf, FULL_MASK, step)),
        (subtb, naive_subtb(log_flow, log_pf, FULL_MASK, 0.7)),
    ]
    for ours, naive in pairs:
        assert torch.allclose(ours, naive, atol=1e-10)
        for a, b in zip(grads(ours, leaves), grads(naive, leaves)):
            assert torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-6)
    assert (db * (1 - FULL_MASK)).abs().max() == 0 and db.max() > 0


def test_normalizations_share_the_pair_terms_and_differ_only_in_the_divisor():
    mask, log_pf, log_flow, *_ = random_batch(5, batch=9, length=6)
    n = mask.sum(-1)
    per_row = subtb_log_normalizer(mask, 0.7, "sequence")
    # W_b = Σ_{0≤i<j≤n} λ^{j−i−1} = Σ_{ℓ=1..n} (n − ℓ + 1) λ^{ℓ−1}, in closed form
    closed = torch.tensor([sum((k - ell + 1) * 0.7 ** (ell - 1) for ell in range(1, int(k) + 1)) for k in n])
    assert torch.allclose(per_row.exp(), closed.double(), atol=1e-12)
    assert torch.isneginf(per_row[n == 0]).all()
    batch_norm = subtb_log_normalizer(mask, 0.7, "gfn-lm-tuning")
    assert torch.allclose(batch_norm.exp(), closed.double().mean().expand(9), atol=1e-12)
    by_sequence = subtrajectory_balance(log_flow, log_pf, mask, 0.7)
    by_batch = subtrajectory_balance(log_flow, log_pf, mask, 0.7, normalization="gfn-lm-tuning")
    assert torch.allclose(by_batch * closed.double().mean(), by_sequence * closed.double(), atol=1e-10)
    # groups: each group is normalised by its own mean weight; a group without any pair gives zeros
    group = torch.tensor([5, 5, 5, 9, 9, 9, 2, 2, 2])
    grouped = subtb_log_normalizer(mask, 0.7, "gfn-lm-tuning", group)
    for g in (5, 9, 2):
        rows = group == g
        assert torch.allclose(grouped[rows].exp(), closed.double()[rows].mean().expand(3), atol=1e-12)
    empty = subtrajectory_balance(
        log_flow[:2], log_pf[:2], torch.zeros_like(mask[:2]), 0.7, normalization="gfn-lm-tuning"
    )
    assert empty.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="normalization"):
        subtb_log_normalizer(mask, 0.7, "batch")


def test_lam_per_row_and_empty_rows():
    mask, log_pf, log_flow, *_ = random_batch(6)
    lam = torch.linspace(0.2, 2.0, mask.shape[0], dtype=torch.float64)
    rowwise = torch.stack(
        [subtrajectory_balance(log_flow, log_pf, mask, float(x))[b] for b, x in enumerate(lam)]
    )
    assert torch.allclose(subtrajectory_balance(log_flow, log_pf, mask, lam), rowwise, atol=1e-12)
    assert subtrajectory_balance(log_flow, log_pf, mask, 0.5)[mask.sum(-1) == 0].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError):
        subtrajectory_balance(log_flow[:, :-1], log_pf, mask)


# --- (3) λ limits ----------------------------------------------------------------------------


def test_subtb_small_lambda_is_mean_db_and_large_lambda_is_the_full_trajectory():
    mask, log_pf, log_flow, *_ = random_batch(7, batch=12, length=6)
    rows = mask.sum(-1) > 0
    mask, log_pf, log_flow = mask[rows], log_pf[rows].detach(), log_flow[rows].detach()
    n = mask.sum(-1)
    mean_db = detailed_balance(log_flow, log_pf, mask).sum(-1) / n
    assert torch.allclose(subtrajectory_balance(log_flow, log_pf, mask, 0.0), mean_db, atol=1e-12)
    assert torch.allclose(subtrajectory_balance(log_flow, log_pf, mask, 1e-6), mean_db, rtol=1e-4)
    # the full-trajectory residual: TB with log Z = log F(s_0), log R = log F(s_n)
    terminal = log_flow.gather(1, n.long().unsqueeze(-1)).squeeze(-1)
    full = trajectory_balance(log_flow[:, 0], log_pf, mask, terminal)
    assert torch.allclose(subtrajectory_balance(log_flow, log_pf, mask, 1e6), full, rtol=1e-4)
    assert torch.allclose(subtrajectory_balance(log_flow, log_pf, mask, 1e300), full, rtol=1e-12)
    # in between it is neither (rows with n ≥ 2)
    middle = subtrajectory_balance(log_flow, log_pf, mask, 1.0)[n >= 2]
    assert ((middle - mean_db[n >= 2]).abs() > 1e-3).all() and ((middle - full[n >= 2]).abs() > 1e-3).all()


# --- (4) training reaches the target ---------------------------------------------------------


def total_variation(logits, log_reward):
    log_pf, _ = rollout_terms(logits)
    terminal = (log_pf * FULL_MASK).sum(-1).exp()
    return 0.5 * (terminal - torch.softmax(log_reward, 0)).abs().sum()


def test_minimising_tb_learns_the_reward_distribution_and_log_z():
    log_reward = 1.5 * rewards(8)
    logits = torch.zeros(N, TOKENS + 1, dtype=torch.float64, requires_grad=True)
    log_z = torch.zeros((), dtype=torch.float64, requires_grad=True)
    assert total_variation(logits.detach(), log_reward) > 0.2
    optimiser = torch.optim.Adam([logits, log_z], lr=0.1)
    for _ in range(200):  # full enumeration, uniform weights over the 40 objects
        log_pf, _ = rollout_terms(logits)
        loss = trajectory_balance(log_z, log_pf, FULL_MASK, log_reward).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert total_variation(logits.detach(), log_reward) < 0.02
    assert log_z.item() == pytest.approx(torch.logsumexp(log_reward, 0).item(), abs=0.02)


@pytest.mark.parametrize("normalization", ["gfn-lm-tuning", "sequence"])
def test_minimising_modified_subtb_learns_the_reward_distribution_without_log_z(normalization):
    log_reward = 1.5 * rewards(9)
    prefix_reward = log_reward[STATES[:, : MAX_TRACE + 1]]
    logits = torch.zeros(N, TOKENS + 1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.Adam([logits], lr=0.1)
    for _ in range(200):
        log_pf, log_terminal = rollout_terms(logits)
        loss = modified_subtrajectory_balance(
            log_pf[:, :MAX_TRACE], log_terminal, TRACE_MASK, prefix_reward, normalization=normalization
        )
        optimiser.zero_grad()
        loss.mean().backward()
        optimiser.step()
    assert total_variation(logits.detach(), log_reward) < 0.02


# --- reward tempering, heads, calibration ------------------------------------------------------


@pytest.mark.parametrize("start,end", [(1.1, 0.5), (0.5, 2.0), (1.0, 1.0)])
def test_reward_temperature_schedules_equal_their_closed_forms(start, end):
    """linear = interpolation between the end points; cosine = end + (start − end)·cos²(πu/2), the
    half-angle form of (1 + cos πu)/2; both hold `end` after `steps`; constant and `end=None` hold `start`."""
    steps = 150
    for step in range(-3, 2 * steps):
        u = min(max(step, 0), steps) / steps
        linear = start * (1 - u) + end * u
        cosine = end + (start - end) * math.cos(math.pi * u / 2) ** 2
        assert reward_temperature_at(step, start, end, steps, "linear") == pytest.approx(linear, abs=1e-12)
        assert reward_temperature_at(step, start, end, steps, "cosine") == pytest.approx(cosine, abs=1e-12)
        assert reward_temperature_at(step, start, end, steps, "constant") == start
        assert reward_temperature_at(step, start, None, steps, "linear") == start
    assert reward_temperature_at(10, start, end, 0, "cosine") == start  # no schedule length: the start
    with pytest.raises(ValueError, match="unknown reward temperature schedule 'step'"):
        reward_temperature_at(10, start, end, steps, "step")


def test_heads_start_at_their_init_and_compute_the_mlp():
    features = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))
    head = MLPHead(16, width=8, init=1.5)
    assert torch.equal(head(features), torch.full((3, 5), 1.5))  # zero-initialised last layer
    torch.nn.init.normal_(head.outer.weight, generator=torch.Generator().manual_seed(1))
    inner = features.double() @ head.inner.weight.double().T + head.inner.bias.double()
    gelu = 0.5 * inner * (1 + torch.erf(inner / math.sqrt(2)))  # exact GELU
    expected = gelu @ head.outer.weight.double().T[:, 0] + head.outer.bias.double()
    assert torch.allclose(head(features).double(), expected, atol=1e-5)
    log_z = ScalarLogZ(-2.0)
    values = log_z(features)
    assert values.shape == (3, 5) and torch.equal(values, torch.full((3, 5), -2.0))
    (values * torch.arange(15.0).view(3, 5)).sum().backward()
    assert log_z.value.grad.item() == sum(range(15))  # one parameter shared by every row
    assert set(balance_heads("tb", "scalar", 16)) == {"log_z"}
    assert isinstance(balance_heads("tb", "prompt", 16)["log_z"], MLPHead)
    assert set(balance_heads("subtb", "scalar", 16)) == set(balance_heads("db", "prompt", 16)) == {"flow"}
    assert not list(balance_heads("modified_subtb", "scalar", 16).parameters())


def test_group_variances_is_the_mean_within_group_sample_variance():
    groups = [4, 4, 9, 4, 9, 7]
    values = [1.0, 2.0, -1.0, 6.0, 3.0, 5.0]
    # group 4: {1, 2, 6} (variance 7); group 9: {−1, 3} (variance 8); group 7 alone: left out
    assert group_variances(groups, values) == pytest.approx((7.0 + 8.0) / 2, rel=1e-6)
    assert group_variances([1, 2], [0.5, 0.7]) is None
    assert group_variances([], []) is None
