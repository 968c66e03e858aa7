"""KL-regularised RL as Bayesian inference and distribution matching: DPG / GDC++, KL-RL, f-DPG.

Target p(x|c) = P(x|c)/Z_c with the frozen base a (the starting policy, or the LoRA-disabled base
of a PEFT policy) and the combined reward r:
- `tilt`:      P = a(x)·exp(r(x)/β)             (the posterior KL-regularised RL targets);
- `pointwise`: P = a(x)·b(x), b = 1[r ≥ threshold] (e.g. "the answer is correct");
- `moments`:   P = a(x)·exp(λ·φ(x))             (λ fitted so that E_p[φ] = the target moments;
  with `moments_with_constraint` the base of the tilt is a·b).
Completions x_i are sampled from a proposal q: the policy itself (`online`, q = π, log q = the
engine's sampling log-probs) or a frozen snapshot (`offline`, log q by teacher forcing), replaced by π
every K generations when π is closer to p by the estimated KL(p‖·) or TV (the adaptive update).
Z_c is estimated by importance sampling, log Ẑ = log mean_q[P/q], pooled over every visit of the
prompt (`conditional`, one Z per prompt) or over the whole batch, all samples or the last W batches.
The sequence-level pseudo-reward R = (π/q)·r_f of the chosen divergence (fkl = DPG, rkl = KL-RL, js,
tv; r_f = −f′(π/p), `reasoning.objectives.bayes`) minus a baseline B = b·(π/q) gives the loss
−(R − B)·log π(x), averaged over the optimizer step's samples (`pseudo_reward_loss`):
E_q[R ∇log π] = −∇D(p, π), and the baseline term has mean zero for any q. GDC++: b = c = E_π[r_f],
which is exactly 1 for fkl (Korbak et al. 2022); `moving_average`: b = the mean of r_f over the last
`baseline_window` samples of earlier generations (naver/disco's windowed moving average; none before
the first), so B multiplies the importance ratio as in disco's `FDivergenceLoss`.

Warpers. a, π and q are compared as *distributions of complete sequences*, so they must be scored
with the warpers used for sampling. By default the trainer requires temperature 1 and no top-k /
top-p (a is then the base model itself) and raises otherwise; with `score_with_sampling_warpers`
the warped distributions are the ones compared (a_T, π_T, q_T: every log-prob is computed with the
sampling temperature, top-k and top-p), which changes the target to a_T·b or a_T·exp(r/β).
"""

from __future__ import annotations

import inspect
import math
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from reasoning.data.templates import PlainTemplate
from reasoning.objectives.bayes import (
    effective_sample_size,
    estimate_forward_kl,
    estimate_kl_policy_base,
    estimate_log_z,
    estimate_tv,
    f_pseudo_reward,
    fit_moment_lambdas,
    group_log_mean_exp,
    log_target,
    moment_log_target,
    pointwise_log_target,
    pool_log_means,
    pseudo_reward,
    pseudo_reward_loss,
    self_normalized_moments,
)
from reasoning.objectives.logprobs import masked_mean
from reasoning.rewards.math import extract_answer
from reasoning.rewards.verifier import correctness
from reasoning.rollout import Rollout
from reasoning.trainers.base import (
    RewardFunction,
    RolloutTrainer,
    RolloutTrainerConfig,
    is_peft_model,
)

DIVERGENCES = ("fkl", "rkl", "js", "tv")
TARGETS = ("tilt", "pointwise", "moments")
PROPOSALS = ("online", "offline")
UPDATE_METRICS = ("kl", "tv", "always")
BASELINES = ("gdc++", "moving_average", "none")


@dataclass
class BayesConfig(RolloutTrainerConfig):
    """The `bayes:` section of a recipe."""

    divergence: str = field(
        default="fkl",
        metadata={"help": "fkl (DPG: KL(p‖π)), rkl (KL-RL: KL(π‖p)), js or tv (f-DPG)."},
    )
    target: str = field(
        default="pointwise",
        metadata={"help": "tilt a·exp(r/β), pointwise a·1[r ≥ threshold], moments a·exp(λ·φ)."},
    )
    beta: float = field(default=0.1, metadata={"help": "Temperature β of the tilt a·exp(r/β)."})
    constraint_threshold: float = field(
        default=1.0, metadata={"help": "Pointwise constraint b(x) = 1[combined reward ≥ this]."}
    )
    moment_features: list[str] = field(
        default_factory=list,
        metadata={"help": "Feature names φ_i of a moment target (uses_multiplication, correct, ...)."},
    )
    moment_targets: list[float] = field(
        default_factory=list, metadata={"help": "Target moments E_p[φ_i], one per feature."}
    )
    moment_lambdas: list[float] | None = field(
        default=None, metadata={"help": "Fixed λ of the moment target (default: fitted before training)."}
    )
    moment_fit_samples: int = field(
        default=512, metadata={"help": "Samples from the proposal used to fit λ by self-normalised IS."}
    )
    moments_with_constraint: bool = field(
        default=False,
        metadata={"help": "Moment target on top of the pointwise one: a·b·exp(λ·φ) (moments of correct x)."},
    )
    proposal: str = field(
        default="online", metadata={"help": "online (q = π) or offline (q = a frozen snapshot of π)."}
    )
    proposal_update_every: int = field(
        default=1, metadata={"help": "Offline: consider replacing q by π every this many generations."}
    )
    proposal_update_metric: str = field(
        default="kl",
        metadata={"help": "Offline update rule: kl (KL(p‖π) < KL(p‖q)), tv, or always (periodic snapshot)."},
    )
    baseline: str = field(
        default="gdc++",
        metadata={
            "help": "gdc++ (c·π/q, c = 1 for fkl), moving_average (b·π/q, b = windowed mean of −f′(π/p), "
            "as naver/disco) or none."
        },
    )
    baseline_window: int = field(
        default=1024,
        metadata={
            "help": "moving_average: b averages −f′(π/p) over the last this many samples (disco: 1024)."
        },
    )
    conditional: bool = field(
        default=True, metadata={"help": "One Z per prompt (conditional target) instead of one for the batch."}
    )
    z_window: int = field(
        default=0, metadata={"help": "Ẑ pools the last W estimates (per prompt when conditional); 0 = all."}
    )
    max_pseudo_reward: float | None = field(
        default=None, metadata={"help": "Clip |R − B| at this value (biased; tames offline weights)."}
    )
    score_with_sampling_warpers: bool = field(
        default=False,
        metadata={
            "help": "Allow temperature ≠ 1 / top-k / top-p: a, π and q are then the warped distributions."
        },
    )

    def __post_init__(self) -> None:
        for name, value, choices in (
            ("divergence", self.divergence, DIVERGENCES),
            ("target", self.target, TARGETS),
            ("proposal", self.proposal, PROPOSALS),
            ("proposal_update_metric", self.proposal_update_metric, UPDATE_METRICS),
            ("baseline", self.baseline, BASELINES),
        ):
            if value not in choices:
                raise ValueError(f"{name} {value!r} is not one of {', '.join(choices)}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta} (β → 0 is the pointwise target)")
        if self.divergence == "rkl" and (
            self.target == "pointwise" or (self.target == "moments" and self.moments_with_constraint)
        ):
            raise ValueError(
                "divergence rkl (KL-RL) needs a target with P(x) > 0 everywhere: KL(π‖p) is infinite when "
                "p(x) = 0 where π(x) > 0; use target tilt (a·exp(r/β), small β approaches the constraint) "
                "or divergence fkl / js / tv"
            )
        if self.target == "moments":
            if not self.moment_features:
                raise ValueError("target moments needs moment_features (e.g. [uses_multiplication])")
            given = self.moment_lambdas if self.moment_lambdas is not None else self.moment_targets
            if len(given) != len(self.moment_features):
                what = "moment_lambdas" if self.moment_lambdas is not None else "moment_targets"
                raise ValueError(
                    f"{len(self.moment_features)} moment_features but {len(given)} {what}; give one per feature"
                )
        if self.proposal_update_every < 1:
            raise ValueError(f"proposal_update_every must be >= 1, got {self.proposal_update_every}")
        if self.baseline_window < 1:
            raise ValueError(f"baseline_window must be >= 1 (samples), got {self.baseline_window}")
        if self.z_window < 0:
            raise ValueError(f"z_window must be >= 0 (0 = all samples), got {self.z_window}")


# ------------------------------------------------------------------------------------- features


def final_answer(text: str) -> str | None:
    """The final answer of a completion: after the plain template's `A:` marker, else a boxed answer."""
    _, answer = PlainTemplate().split_completion(text)
    return answer if answer is not None else extract_answer(text)


def _answer_uses(symbol: str, name: str) -> RewardFunction:
    def feature(prompts: list, completions: list, **columns: Any) -> list[float]:
        answers = [final_answer(str(c)) for c in completions]
        return [float(a is not None and symbol in a) for a in answers]

    feature.__name__ = name
    return feature


# Named features φ(x) for moment targets, TRL reward signature; more can be passed as `feature_funcs=`.
FEATURES: dict[str, RewardFunction] = {
    "uses_multiplication": _answer_uses("*", "uses_multiplication"),
    "uses_division": _answer_uses("/", "uses_division"),
    "uses_addition": _answer_uses("+", "uses_addition"),
    "uses_subtraction": _answer_uses("-", "uses_subtraction"),
    "correct": correctness,
}


def distinct_n(sequences: list[list[int]], n: int) -> float:
    """Distinct-n: unique n-grams / all n-grams over `sequences` (1.0 when there are none)."""
    grams = [tuple(s[i : i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def check_sampling_warpers(sampling: Any, config: BayesConfig) -> None:
    """Raise unless the importance weights can be computed with the warpers used for sampling."""
    if sampling.temperature == 0:
        raise ValueError(
            "BayesTrainer needs stochastic sampling: temperature 0 (greedy) is not a distribution q(x), "
            "so importance weights P(x)/q(x) do not exist; sample with temperature 1"
        )
    warped = sampling.temperature != 1 or sampling.top_k > 0 or sampling.top_p < 1
    if warped and not config.score_with_sampling_warpers:
        raise ValueError(
            f"BayesTrainer: sampling uses warpers (temperature={sampling.temperature}, top_k={sampling.top_k}, "
            f"top_p={sampling.top_p}) but the target is defined with the unwarped base a(x): the importance "
            "weights P(x)/q(x) would compare a temperature-1 base with a warped proposal and be wrong. "
            "Either sample with temperature 1, top_k 0, top_p 1 (the `rollout:` section), or set "
            "`score_with_sampling_warpers: true` (the `bayes:` section) to score a, π and q with the same "
            "warpers, which makes the target the warped base a_T·b (or a_T·exp(r/β))"
        )


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


# --------------------------------------------------------------------------------------- trainer


class BayesTrainer(RolloutTrainer):
    """Distribution matching / KL-regularised RL towards p ∝ a·(tilt) (see the module docstring).

    Extra constructor arguments: `base_model` (the frozen a; default a frozen copy of the starting
    policy, or the adapter-disabled policy when it is a PEFT model) and `feature_funcs` (name ->
    TRL-style function, extending `FEATURES` for moment targets).
    """

    scores_top_k_top_p = True  # `policy_logprobs` applies the sampling warpers

    config: BayesConfig

    def __init__(
        self,
        *args: Any,
        base_model: torch.nn.Module | None = None,
        feature_funcs: dict[str, RewardFunction] | None = None,
        **kwargs: Any,
    ) -> None:
        bound = inspect.signature(RolloutTrainer.__init__).bind(self, *args, **kwargs).arguments
        check_sampling_warpers(bound["sampling"], bound["config"])  # fail before the dataset is mapped
        super().__init__(*args, **kwargs)
        cfg = self.config
        policy = self.accelerator.unwrap_model(self.model)
        self.base_model = base_model
        if base_model is None and not is_peft_model(policy):
            self.base_model = self.policy_copy()  # under ZeRO-3: a partitioned inference engine
        if self.base_model is not None:
            self.base_model.eval()  # (a DeepSpeed engine's eval() returns None)
            self.base_model.requires_grad_(False)
        available = {**FEATURES, **(feature_funcs or {})}
        unknown = [name for name in cfg.moment_features if name not in available]
        if unknown:
            raise ValueError(f"unknown moment feature(s) {unknown}; choose from {sorted(available)}")
        self.feature_funcs: list[RewardFunction] = [available[name] for name in cfg.moment_features]
        self.moment_lambdas: torch.Tensor | None = (
            torch.tensor(cfg.moment_lambdas, dtype=torch.float64) if cfg.moment_lambdas is not None else None
        )
        # state saved in checkpoints
        self.log_z_state: dict[str, list[tuple[float, float]]] = {}
        self.baseline_value: float | None = None  # the mean of `baseline_window_values`
        self.baseline_window_values: list[float] = []
        self.proposal_updates = 0
        self._window: dict[str, list[float]] = {"policy": [], "proposal": []}
        self._generations_since_check = 0
        self.proposal_model: torch.nn.Module | None = None
        self._proposal_dirty = False
        if cfg.proposal == "offline":
            plugin = self.accelerator.state.deepspeed_plugin if self.is_deepspeed_enabled else None
            if plugin is not None and plugin.zero_stage == 3:
                # q is refreshed from π with load_state_dict, which a partitioned copy does not take
                raise ValueError(
                    "bayes.proposal: offline is not supported under DeepSpeed ZeRO-3; use proposal: online "
                    "or ZeRO-2"
                )
            self.proposal_model = self.policy_copy()
            self._proposal_dirty = True  # the engine must hold q before the first generation
            if getattr(self.engine, "model", None) is policy:
                # an hf engine wrapping the live policy would sample from π: give it the snapshot q
                from reasoning.rollout.hf import HFEngine

                self.engine = HFEngine(model=self.proposal_model, tokenizer=self.processing_class)

    # ------------------------------------------------------------------ models
    def sync_engine(self) -> None:
        """Online: push π every step (base behaviour). Offline: push q, only when it changed."""
        if self.config.proposal == "online":
            return super().sync_engine()
        if not self._proposal_dirty:
            return
        self.engine.sync_weights(self.proposal_model)
        self._proposal_dirty = False
        self.sync_count += 1

    def needs_old_logprobs(self) -> bool:
        return False  # the pseudo-rewards use log q (engine or snapshot) and the live log π

    @torch.no_grad()
    def base_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-token log a(x) under the frozen base, with the sampling warpers (as `policy_logprobs`)."""
        if self.base_model is not None:
            return self.logprobs_without_grad(self.base_model, batch)
        with self.accelerator.unwrap_model(self.model).disable_adapter():
            return self.logprobs_without_grad(self.model, batch)

    def policy_logprobs(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The base's chunked path (temperature only); with top-k / top-p, the full warped distribution."""
        if self.sampling.top_k == 0 and self.sampling.top_p >= 1:
            return super().policy_logprobs(model, batch, with_entropy=with_entropy)
        from transformers import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        device = next(model.parameters()).device
        prompt_ids, completion_ids = batch["prompt_ids"].to(device), batch["completion_ids"].to(device)
        attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1).to(device)
        width = completion_ids.shape[1]
        logits = model(
            input_ids=torch.cat([prompt_ids, completion_ids], dim=1),
            attention_mask=attention,
            logits_to_keep=width + 1,
        ).logits[:, :-1]
        warpers = LogitsProcessorList([TemperatureLogitsWarper(self.sampling.temperature)])
        if self.sampling.top_k:
            warpers.append(TopKLogitsWarper(self.sampling.top_k))
        if self.sampling.top_p < 1:
            warpers.append(TopPLogitsWarper(self.sampling.top_p))
        flat = warpers(None, logits.float().reshape(-1, logits.shape[-1]))
        logp = (
            torch.log_softmax(flat, dim=-1).gather(-1, completion_ids.reshape(-1, 1)).view_as(completion_ids)
        )
        # padding positions may hold tokens the warpers exclude (log-prob −inf): zero them, as masked anyway
        logp = logp.masked_fill(~batch["completion_mask"].to(device).bool(), 0.0)
        return logp.float(), None

    def record(self, name: str, value: float | torch.Tensor) -> None:
        """As the base, but an undefined estimate (nan: no prompt with Ẑ > 0 yet) is not logged."""
        if not math.isnan(float(value)):
            super().record(name, value)

    # ------------------------------------------------------------------ target
    def _call_on_rollouts(
        self, functions: list[RewardFunction], rows: list[dict[str, Any]], groups: list[list[Rollout]]
    ) -> torch.Tensor:
        flat_rows = [row for row, group in zip(rows, groups) for _ in group]
        rollouts = [r for group in groups for r in group]
        columns = {
            k: [row[k] for row in flat_rows] for k in flat_rows[0] if k not in ("prompt", "prompt_ids")
        }
        columns["trainer_state"] = self.state
        table = self.call_rewards(
            functions,
            [row["prompt"] for row in flat_rows],
            [r.text for r in rollouts],
            [r.completion_ids for r in rollouts],
            columns,
        )
        # a not-applicable or (reward_failures: skip) failed value counts as 0, as in the reward sum
        return table.nan_to_num(nan=0.0)

    def constraint(self, rewards: torch.Tensor) -> torch.Tensor:
        """b(x) = 1[r(x) ≥ threshold], bool `[N]`."""
        return rewards >= self.config.constraint_threshold

    def target_log_prob(
        self, log_base: torch.Tensor, rewards: torch.Tensor, features: torch.Tensor | None
    ) -> torch.Tensor:
        """log P(x) `[N]` of the configured target from log a(x), the combined reward and φ(x)."""
        cfg = self.config
        if cfg.target == "tilt":
            return log_target(log_base, rewards, cfg.beta)
        if cfg.target == "pointwise" or cfg.moments_with_constraint:
            log_base = pointwise_log_target(log_base, self.constraint(rewards))
        if cfg.target == "pointwise":
            return log_base
        return moment_log_target(log_base, features, self.moment_lambdas)

    def fit_moments(self) -> torch.Tensor:
        """Fit λ of the moment target on `moment_fit_samples` fresh samples of the proposal (SNIS).

        Conditional targets use `fit_conditional_moment_lambdas` (mean over prompts of the per-prompt
        moments); otherwise `fit_moment_lambdas` on the pooled samples.
        """
        cfg = self.config
        size = cfg.num_generations
        count = max(1, math.ceil(cfg.moment_fit_samples / size))
        order = list(range(len(self.train_dataset)))
        random.Random(self.args.seed + 1).shuffle(order)
        rows = [self.train_dataset[i] for i in order[:count]]
        self.sync_engine()
        groups = self.engine.generate([row["prompt_ids"] for row in rows], self.generation_sampling(), n=size)
        batch = self.collate_rollouts(groups)
        mask = batch["completion_mask"].float()
        log_base = (self.base_logprobs(batch) * mask).sum(-1)
        log_q = self._proposal_sequence_logprobs(batch)
        features = self._call_on_rollouts(self.feature_funcs, rows, groups).double()
        log_w0 = (log_base - log_q).double()
        if cfg.moments_with_constraint:
            rewards = self.combine_rewards(self.score(rows, groups))
            log_w0 = pointwise_log_target(log_w0, self.constraint(rewards))
        targets = torch.tensor(cfg.moment_targets, dtype=torch.float64)
        index = torch.arange(len(log_w0)) // size
        if cfg.conditional:
            lambdas = fit_conditional_moment_lambdas(features, log_w0, index, targets)
            shifted = moment_log_target(log_w0, features, lambdas).view(-1, size)
            keep = shifted.isfinite().any(-1)
            moments = self_normalized_moments(
                features.view(-1, size, features.shape[-1])[keep], shifted[keep]
            )
            moments = moments.mean(0)
        else:
            lambdas = fit_moment_lambdas(features, log_w0, targets)
            moments = self_normalized_moments(features, moment_log_target(log_w0, features, lambdas))
        if self.accelerator.num_processes > 1:  # one target for every rank: rank 0's fit
            from accelerate.utils import broadcast

            lambdas = broadcast(lambdas.double().to(self.accelerator.device), from_process=0).cpu()
        self.moment_lambdas = lambdas.double()
        for name, lam, moment in zip(cfg.moment_features, lambdas.tolist(), moments.tolist()):
            self.record(f"bayes/lambda/{name}", lam)
            self.record(f"bayes/fitted_moment/{name}", moment)
        return self.moment_lambdas

    def _proposal_sequence_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """log q(x) `[N]`: engine log-probs online (q = π), teacher forcing of the snapshot offline."""
        mask = batch["completion_mask"].float()
        if self.config.proposal == "online":
            return (batch["engine_logprobs"] * mask).sum(-1)
        return (self.logprobs_without_grad(self.proposal_model, batch) * mask).sum(-1)

    # ------------------------------------------------------------------ Z
    def _pooled_log_z(self, keys: list[str], log_means: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Add this batch's estimates to the running ones and return the pooled log Ẑ per key `[C]`.

        Under data parallelism every rank adds every rank's estimates (one all-gather), so the ranks
        hold the same state (a checkpoint written by rank 0 has every prompt's) and the batch-wide Z
        (key "") is the global batch's; estimates of one key from one call are pooled into one entry.
        """
        window = self.config.z_window
        entries = list(zip(keys, log_means.tolist(), counts.tolist()))
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            entries = gather_object(entries)
        merged: dict[str, list[tuple[float, float]]] = {}
        for key, value, count in entries:
            merged.setdefault(key, []).append((value, count))
        for key, parts in merged.items():
            if len(parts) > 1:
                values = torch.tensor([v for v, _ in parts], dtype=torch.float64)
                sizes = torch.tensor([n for _, n in parts], dtype=torch.float64)
                parts = [(float(pool_log_means(values, sizes)), float(sizes.sum()))]
            value, count = parts[0]
            history = self.log_z_state.setdefault(key, [])
            history.append((value, count))
            if window:
                del history[:-window]
            elif len(history) > 1:
                pooled = pool_log_means(
                    torch.tensor([v for v, _ in history], dtype=torch.float64),
                    torch.tensor([n for _, n in history], dtype=torch.float64),
                )
                history[:] = [(float(pooled), sum(n for _, n in history))]
        out = []
        for key in keys:
            history = self.log_z_state[key]
            out.append(
                pool_log_means(
                    torch.tensor([v for v, _ in history], dtype=torch.float64),
                    torch.tensor([n for _, n in history], dtype=torch.float64),
                )
            )
        return torch.stack(out)

    # ------------------------------------------------------------------ batch
    def build_batch(
        self, rows: list[dict[str, Any]], groups: list[list[Rollout]], rewards: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        cfg = self.config
        batch = super().build_batch(rows, groups, rewards)
        size = cfg.num_generations
        n = batch["completion_ids"].shape[0]
        mask = batch["completion_mask"].float()
        r = batch["rewards"].double()
        log_base = (self.base_logprobs(batch) * mask).sum(-1).double()
        log_q = self._proposal_sequence_logprobs(batch).double()
        if cfg.proposal == "online":
            log_pi = log_q  # q = π at generation time
        else:
            log_pi = (self.logprobs_without_grad(self.model, batch) * mask).sum(-1).double()
            engine_q = (batch["engine_logprobs"] * mask).sum(-1).double()
            self.record("sampling/logq_difference_mean", (engine_q - log_q).abs().mean())
        features = None
        if cfg.target == "moments":
            if self.moment_lambdas is None:
                self.fit_moments()
            features = self._call_on_rollouts(self.feature_funcs, rows, groups).double()
        log_p = self.target_log_prob(log_base, r, features)

        # one Z per prompt (conditional) or one for the batch, pooled with earlier estimates
        if cfg.conditional:
            keys = [row["prompt"] for row in rows]
            batch_log_z = estimate_log_z(log_p.view(-1, size), log_q.view(-1, size))
            counts = torch.full((len(keys),), float(size))
            context_log_z = self._pooled_log_z(keys, batch_log_z, counts)
            per_sample_log_z = context_log_z.repeat_interleave(size)
            shape = (-1, size)
        else:
            batch_log_z = estimate_log_z(log_p, log_q).reshape(1)
            context_log_z = self._pooled_log_z([""], batch_log_z, torch.tensor([float(n)]))
            per_sample_log_z = context_log_z.expand(n).clone()
            shape = (1, -1)

        # baselines, from π at generation time (the loss recomputes R from the live π)
        reward_now = pseudo_reward(cfg.divergence, log_p, per_sample_log_z, log_pi, log_q)
        reward_now = torch.where(per_sample_log_z.isfinite(), reward_now, torch.zeros_like(reward_now))
        ratio = torch.exp(log_pi - log_q)
        # batch-wide statistics over every rank's samples (a context's samples stay on one rank)
        all_rewards, _ = self.gather_generation(reward_now)
        all_ratios, _ = self.gather_generation(ratio)
        if cfg.divergence == "fkl":
            coefficient = torch.ones(n, dtype=torch.float64)
        elif cfg.conditional:  # c = E_π[R·q/π] by self-normalised IS, per context (or batch)
            coefficient = reward_now.view(shape).sum(-1) / ratio.view(shape).sum(-1)
            coefficient = coefficient.repeat_interleave(size)
        else:
            coefficient = (all_rewards.sum() / all_ratios.sum()).expand(n)
        used = 0.0
        if cfg.baseline == "moving_average":
            # disco: b is the window's mean before this batch (none at first), then the batch's −f′(π/p)
            # join the window; a context without target mass contributes nothing (disco skips it)
            used = self.baseline_value if self.baseline_value is not None else 0.0
            pointwise = f_pseudo_reward(cfg.divergence, log_p, per_sample_log_z, log_pi)
            all_pointwise, _ = self.gather_generation(pointwise)
            all_finite, _ = self.gather_generation(per_sample_log_z.isfinite().double())
            window = self.baseline_window_values + all_pointwise[all_finite > 0].tolist()
            self.baseline_window_values = window[-cfg.baseline_window :]
            if self.baseline_window_values:
                self.baseline_value = sum(self.baseline_window_values) / len(self.baseline_window_values)
            self.record("bayes/baseline", used)
        batch.update(
            log_target=log_p.float(),
            log_z=per_sample_log_z.float(),
            log_proposal=log_q.float(),
            log_base=log_base.float(),
            baseline_coef=coefficient.float(),
            baseline_value=torch.full((n,), used, dtype=torch.float32),
        )
        self._record_estimates(
            rows, groups, batch, log_p, log_pi, log_q, log_base, context_log_z, shape, features
        )
        self._maybe_update_proposal(log_p, log_pi, log_q, context_log_z, shape)
        return batch

    def _record_estimates(
        self,
        rows: list[dict[str, Any]],
        groups: list[list[Rollout]],
        batch: dict[str, torch.Tensor],
        log_p: torch.Tensor,
        log_pi: torch.Tensor,
        log_q: torch.Tensor,
        log_base: torch.Tensor,
        context_log_z: torch.Tensor,
        shape: tuple[int, int],
        features: torch.Tensor | None,
    ) -> None:
        cfg = self.config
        lp, lpi, lq, la = (t.view(shape) for t in (log_p, log_pi, log_q, log_base))
        finite = context_log_z.isfinite()
        self.record("bayes/contexts_with_target_mass", finite.double().mean())
        self.record("bayes/log_z_batch", _nanmean(estimate_log_z(lp, lq), finite))
        self.record("bayes/log_z", _nanmean(context_log_z, finite))
        self.record("bayes/z", _nanmean(context_log_z.exp(), finite))
        if finite.any():
            self.record(
                "bayes/kl_target_policy", _nanmean(estimate_forward_kl(lp, lpi, lq, context_log_z), finite)
            )
            self.record("bayes/tv_target_policy", _nanmean(estimate_tv(lp, lpi, lq, context_log_z), finite))
            ess = effective_sample_size(lp - lq)
            self.record("bayes/ess", _nanmean(ess, finite))
            self.record("bayes/ess_fraction", _nanmean(ess / lp.shape[-1], finite))
        self.record("bayes/kl_policy_base", estimate_kl_policy_base(lpi, la, lq).mean())
        ratio = torch.exp(log_pi - log_q)
        self.record("bayes/reward", (ratio * batch["rewards"].double()).mean())
        correct = self.constraint(batch["rewards"])
        self.record("bayes/constraint", (ratio * correct.double()).mean())
        if features is not None:
            for j, name in enumerate(cfg.moment_features):
                self.record(f"bayes/moment/{name}", (ratio * features[:, j]).mean())
        if cfg.proposal == "online":
            self.record("bayes/proposal_updated", 1.0)
        # diversity within each prompt's group
        answers, correct_answers, d1, d2 = [], [], [], []
        i = 0
        for group in groups:
            parsed = [final_answer(r.text) for r in group]
            answers.append(len({"".join(a.split()) for a in parsed if a}))
            correct_answers.append(
                len({"".join(a.split()) for a, ok in zip(parsed, correct[i : i + len(group)]) if a and ok})
            )
            d1.append(distinct_n([r.completion_ids for r in group], 1))
            d2.append(distinct_n([r.completion_ids for r in group], 2))
            i += len(group)
        self.record("diversity/distinct_answers", sum(answers) / len(answers))
        self.record("diversity/distinct_correct_answers", sum(correct_answers) / len(correct_answers))
        self.record("diversity/distinct_1", sum(d1) / len(d1))
        self.record("diversity/distinct_2", sum(d2) / len(d2))

    def _maybe_update_proposal(
        self,
        log_p: torch.Tensor,
        log_pi: torch.Tensor,
        log_q: torch.Tensor,
        context_log_z: torch.Tensor,
        shape: tuple[int, int],
    ) -> None:
        """Offline: every K generations replace q by π if π is closer to p (IS estimates on q's samples)."""
        cfg = self.config
        if cfg.proposal != "offline":
            return
        lp, lpi, lq = (t.view(shape) for t in (log_p, log_pi, log_q))
        finite = context_log_z.isfinite()
        if finite.any() and cfg.proposal_update_metric != "always":
            estimate = estimate_forward_kl if cfg.proposal_update_metric == "kl" else estimate_tv
            policy_metric = float(_nanmean(estimate(lp, lpi, lq, context_log_z), finite))
            proposal_metric = float(_nanmean(estimate(lp, lq, lq, context_log_z), finite))
            if math.isfinite(policy_metric) and math.isfinite(proposal_metric):
                self._window["policy"].append(policy_metric)
                self._window["proposal"].append(proposal_metric)
            self.record(
                "bayes/kl_target_proposal", _nanmean(estimate_forward_kl(lp, lq, lq, context_log_z), finite)
            )
        self._generations_since_check += 1
        updated = False
        if self._generations_since_check >= cfg.proposal_update_every:
            if cfg.proposal_update_metric == "always":
                updated = True
            else:
                # pooled over ranks (every rank reaches this check at the same generation), so that all
                # ranks keep the same proposal
                totals = torch.tensor(
                    [sum(self._window["policy"]), sum(self._window["proposal"]), len(self._window["policy"])],
                    dtype=torch.float64,
                    device=self.accelerator.device,
                )
                policy_sum, proposal_sum, count = self.accelerator.reduce(totals, reduction="sum").tolist()
                if count > 0:
                    self.record("bayes/update_metric_policy", policy_sum / count)
                    self.record("bayes/update_metric_proposal", proposal_sum / count)
                    updated = policy_sum < proposal_sum
            if updated:
                self.replace_proposal()
            self._window = {"policy": [], "proposal": []}
            self._generations_since_check = 0
        self.record("bayes/proposal_updated", float(updated))

    def replace_proposal(self) -> None:
        """q ← π (the engine is re-synced with q before the next generation)."""
        self.proposal_model.load_state_dict(self.accelerator.unwrap_model(self.model).state_dict())
        self._proposal_dirty = True
        self.proposal_updates += 1

    # ------------------------------------------------------------------ loss
    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg = self.config
        mask = batch["completion_mask"].float()
        token_logp, _ = self.policy_logprobs(model, batch)
        log_pi = (token_logp * mask).sum(-1)
        if cfg.proposal == "online" and "engine_logprobs" in batch:
            mismatch = (token_logp.detach() - batch["engine_logprobs"].to(token_logp.device)).abs()
            self.record("sampling/logp_difference_mean", masked_mean(mismatch, mask))
        log_p, log_z, log_q = (
            batch[k].to(log_pi.device).double() for k in ("log_target", "log_z", "log_proposal")
        )
        current = log_pi.detach().double()
        reward = pseudo_reward(cfg.divergence, log_p, log_z, current, log_q)
        # the baseline b of −f′(π/p) enters as b·π/q (`baselined_advantage`), unbiased for q ≠ π
        baseline = {"gdc++": "baseline_coef", "moving_average": "baseline_value"}.get(cfg.baseline)
        b = batch[baseline].to(current.device).double() if baseline else 0.0
        loss, advantage = pseudo_reward_loss(
            cfg.divergence, log_p, log_z, log_pi.double(), log_q, b, cfg.max_pseudo_reward
        )
        self.record(
            "bayes/pseudo_reward_mean", reward[log_z.isfinite()].mean() if log_z.isfinite().any() else 0.0
        )
        self.record("bayes/advantage_abs_mean", advantage.abs().mean())
        accumulation = getattr(
            self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps
        )
        accumulation = accumulation if model.training else 1
        return loss.to(log_pi.dtype) / accumulation

    # ------------------------------------------------------------------ checkpoints
    def trainer_extra_state(self) -> dict[str, Any]:
        state = {
            "log_z_state": {k: list(v) for k, v in self.log_z_state.items()},
            "baseline_value": self.baseline_value,
            "baseline_window_values": list(self.baseline_window_values),
            "moment_lambdas": self.moment_lambdas,
            "proposal_updates": self.proposal_updates,
            "window": {k: list(v) for k, v in self._window.items()},
            "generations_since_check": self._generations_since_check,
        }
        if self.proposal_model is not None:
            state["proposal"] = {
                k: v.detach().cpu().clone() for k, v in self.proposal_model.state_dict().items()
            }
        return state

    def load_trainer_extra_state(self, state: dict[str, Any]) -> None:
        self.log_z_state = {k: [tuple(x) for x in v] for k, v in state["log_z_state"].items()}
        self.baseline_value = state["baseline_value"]
        self.baseline_window_values = list(state.get("baseline_window_values", []))
        self.moment_lambdas = state["moment_lambdas"]
        self.proposal_updates = state["proposal_updates"]
        self._window = {k: list(v) for k, v in state["window"].items()}
        self._generations_since_check = state["generations_since_check"]
        if self.proposal_model is not None and "proposal" in state:
            self.proposal_model.load_state_dict(state["proposal"])
            self._proposal_dirty = True


def _nanmean(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of the finite `values` where `keep` (nan when none)."""
    chosen = values[keep & values.isfinite()]
    return chosen.mean() if chosen.numel() else torch.tensor(float("nan"))


__all__ = [
    "FEATURES",
    "BayesConfig",
    "BayesTrainer",
    "check_sampling_warpers",
    "distinct_n",
    "final_answer",
    "fit_conditional_moment_lambdas",
]
