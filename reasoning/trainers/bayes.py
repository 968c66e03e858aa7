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

import math
import random
from typing import Any

import torch
from accelerate.utils import broadcast, gather_object

from reasoning.objectives.bayes import (
    add_log_z_estimates,
    configured_log_target,
    effective_sample_size,
    estimate_forward_kl,
    estimate_kl_policy_base,
    estimate_log_z,
    estimate_tv,
    f_pseudo_reward,
    fit_conditional_moment_lambdas,
    fit_moment_lambdas,
    gdcpp_coefficient,
    moment_log_target,
    pointwise_log_target,
    pooled_log_z,
    pseudo_reward,
    pseudo_reward_loss,
    self_normalized_moments,
    windowed_mean,
)
from reasoning.rollout import Rollout, Sampling
from reasoning.rollout.hf import HFEngine
from reasoning.trainers.base import LossOutput, RewardFunction, RolloutTrainer
from reasoning.trainers.bayes_config import FEATURES, BayesConfig, final_answer

__all__ = ["FEATURES", "BayesConfig", "BayesTrainer", "distinct_n", "final_answer"]


def distinct_n(sequences: list[list[int]], n: int) -> float:
    """Distinct-n: unique n-grams / all n-grams over `sequences` (1.0 when there are none)."""
    grams = [tuple(s[i : i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


# --------------------------------------------------------------------------------------- trainer


class BayesTrainer(RolloutTrainer):
    """Distribution matching / KL-regularised RL towards p ∝ a·(tilt) (see the module docstring).

    Extra constructor arguments: `base_model` (the frozen a; default a frozen copy of the starting
    policy, or the adapter-disabled policy when it is a PEFT model: `RolloutTrainer.frozen_model`) and
    `feature_funcs` (name -> TRL-style function, extending `FEATURES` for moment targets).
    """

    scores_top_k_top_p = True  # a, π and q are scored with every sampling warper (`policy_logprobs`)

    config: BayesConfig

    @classmethod
    def check_sampling(cls, config: BayesConfig, sampling: Sampling) -> None:
        """The base rule, and: the importance weights can be computed with the warpers used for sampling."""
        super().check_sampling(config, sampling)
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

    def __init__(
        self,
        *args: Any,
        base_model: torch.nn.Module | None = None,
        feature_funcs: dict[str, RewardFunction] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)  # checks the sampling warpers first (`check_sampling`)
        cfg = self.config
        policy = self.accelerator.unwrap_model(self.model)
        self.base = self.frozen_model(base_model)  # under ZeRO-3 a copy is a partitioned inference engine
        # the separate frozen module, None when a PEFT policy's adapter-disabled base is a
        self.base_model = None if self.base.adapter else self.base.module
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
            self.proposal = self.frozen_model(kind="copy")
            self.proposal_model = self.proposal.module
            self._proposal_dirty = True  # the engine must hold q before the first generation
            if getattr(self.engine, "model", None) is policy:
                # an hf engine wrapping the live policy would sample from π: give it the snapshot q
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

    def base_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-token log a(x) `[B, T]` under the frozen base, with the sampling warpers (as `policy_logprobs`)."""
        return self.base.logprobs(batch)

    def _proposal_sequence_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """log q(x) `[N]`: engine log-probs online (q = π), teacher forcing of the snapshot offline."""
        mask = batch["completion_mask"].float()
        if self.config.proposal == "online":
            return (batch["engine_logprobs"] * mask).sum(-1)
        return (self.proposal.logprobs(batch) * mask).sum(-1)

    def record(self, name: str, value: float | torch.Tensor) -> None:
        """As the base, but an undefined estimate (nan: no prompt with Ẑ > 0 yet) is not logged."""
        if not math.isnan(float(value)):
            super().record(name, value)

    # ------------------------------------------------------------------ target
    def features(self, rows: list[dict[str, Any]], groups: list[list[Rollout]]) -> torch.Tensor:
        """φ(x) `[N, M]` of every rollout (float64; not applicable or a skipped failure counts as 0, as in
        the reward sum)."""
        flat_rows = [row for row, group in zip(rows, groups) for _ in group]
        rollouts = [r for group in groups for r in group]
        table = self.reward_table(
            flat_rows, [r.text for r in rollouts], [r.completion_ids for r in rollouts], self.feature_funcs
        )
        return table.nan_to_num(nan=0.0).double()

    def constraint(self, rewards: torch.Tensor) -> torch.Tensor:
        """b(x) = 1[r(x) ≥ threshold], bool `[N]`."""
        return rewards >= self.config.constraint_threshold

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
        features = self.features(rows, groups)
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
            grouped = features.view(-1, size, features.shape[-1])
            moments = self_normalized_moments(grouped[keep], shifted[keep]).mean(0)
        else:
            lambdas = fit_moment_lambdas(features, log_w0, targets)
            moments = self_normalized_moments(features, moment_log_target(log_w0, features, lambdas))
        if self.accelerator.num_processes > 1:  # one target for every rank: rank 0's fit
            lambdas = broadcast(lambdas.double().to(self.accelerator.device), from_process=0).cpu()
        self.moment_lambdas = lambdas.double()
        for name, lam, moment in zip(cfg.moment_features, lambdas.tolist(), moments.tolist()):
            self.record(f"bayes/lambda/{name}", lam)
            self.record(f"bayes/fitted_moment/{name}", moment)
        return self.moment_lambdas

    # ------------------------------------------------------------------ Z
    def _pooled_log_z(self, keys: list[str], log_means: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Add this batch's estimates to the running ones and return the pooled log Ẑ per key `[C]`.

        Under data parallelism every rank adds every rank's estimates (one all-gather), so the ranks
        hold the same state (a checkpoint written by rank 0 has every prompt's) and the batch-wide Z
        (key "") is the global batch's (`objectives.bayes.add_log_z_estimates`).
        """
        entries = list(zip(keys, log_means.tolist(), counts.tolist()))
        if self.accelerator.num_processes > 1:
            entries = gather_object(entries)
        add_log_z_estimates(self.log_z_state, entries, self.config.z_window)
        return torch.stack([pooled_log_z(self.log_z_state[key]) for key in keys])

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
            features = self.features(rows, groups)
        log_p = configured_log_target(
            cfg.target, log_base, r, beta=cfg.beta, threshold=cfg.constraint_threshold, features=features,
            lambdas=self.moment_lambdas, with_constraint=cfg.moments_with_constraint,
        )  # fmt: skip

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
        if cfg.conditional or cfg.divergence == "fkl":  # a context's samples stay on one rank
            coefficient = gdcpp_coefficient(cfg.divergence, reward_now.view(shape), ratio.view(shape))
            coefficient = coefficient.repeat_interleave(n // coefficient.numel())
        else:  # batch-wide: over every rank's samples
            all_rewards, _ = self.gather_generation(reward_now)
            all_ratios, _ = self.gather_generation(ratio)
            coefficient = gdcpp_coefficient(cfg.divergence, all_rewards, all_ratios).expand(n)
        used = 0.0
        if cfg.baseline == "moving_average":
            # disco: b is the window's mean before this batch (none at first), then the batch's −f′(π/p)
            # join the window; a context without target mass contributes nothing (disco skips it)
            used = self.baseline_value if self.baseline_value is not None else 0.0
            pointwise = f_pseudo_reward(cfg.divergence, log_p, per_sample_log_z, log_pi)
            all_pointwise, _ = self.gather_generation(pointwise)
            all_finite, _ = self.gather_generation(per_sample_log_z.isfinite().double())
            self.baseline_window_values, mean = windowed_mean(
                self.baseline_window_values, all_pointwise[all_finite > 0].tolist(), cfg.baseline_window
            )
            self.baseline_value = mean if mean is not None else self.baseline_value
            self.record("bayes/baseline", used)
        batch.update(
            log_target=log_p.float(),
            log_z=per_sample_log_z.float(),
            log_proposal=log_q.float(),
            log_base=log_base.float(),
            baseline_coef=coefficient.float(),
            baseline_value=torch.full((n,), used, dtype=torch.float32),
        )
        self._record_estimates(groups, batch, log_p, log_pi, log_q, log_base, context_log_z, shape, features)
        self._maybe_update_proposal(log_p, log_pi, log_q, context_log_z, shape)
        return batch

    def _record_estimates(
        self, groups: list[list[Rollout]], batch: dict[str, torch.Tensor], log_p: torch.Tensor,
        log_pi: torch.Tensor, log_q: torch.Tensor, log_base: torch.Tensor, context_log_z: torch.Tensor,
        shape: tuple[int, int], features: torch.Tensor | None,
    ) -> None:  # fmt: skip
        """The generation's estimates (averaged over prompts with Ẑ > 0) and its diversity per group."""
        cfg = self.config
        lp, lpi, lq, la = (t.view(shape) for t in (log_p, log_pi, log_q, log_base))
        finite, ratio = context_log_z.isfinite(), torch.exp(log_pi - log_q)
        correct = self.constraint(batch["rewards"])
        metrics = {
            "bayes/contexts_with_target_mass": finite.double().mean(),
            "bayes/log_z_batch": _nanmean(estimate_log_z(lp, lq), finite),
            "bayes/log_z": _nanmean(context_log_z, finite),
            "bayes/z": _nanmean(context_log_z.exp(), finite),
            "bayes/kl_policy_base": estimate_kl_policy_base(lpi, la, lq).mean(),
            "bayes/reward": (ratio * batch["rewards"].double()).mean(),
            "bayes/constraint": (ratio * correct.double()).mean(),
        }
        if finite.any():
            ess = effective_sample_size(lp - lq)
            metrics["bayes/kl_target_policy"] = _nanmean(
                estimate_forward_kl(lp, lpi, lq, context_log_z), finite
            )
            metrics["bayes/tv_target_policy"] = _nanmean(estimate_tv(lp, lpi, lq, context_log_z), finite)
            metrics["bayes/ess"] = _nanmean(ess, finite)
            metrics["bayes/ess_fraction"] = _nanmean(ess / lp.shape[-1], finite)
        for j, name in enumerate(cfg.moment_features if features is not None else []):
            metrics[f"bayes/moment/{name}"] = (ratio * features[:, j]).mean()
        if cfg.proposal == "online":
            metrics["bayes/proposal_updated"] = 1.0
        # diversity within each prompt's group
        answers, correct_answers, d1, d2 = [], [], [], []
        for group, ok in zip(groups, correct.split([len(g) for g in groups])):
            parsed = [final_answer(r.text) for r in group]
            answers.append(len({"".join(a.split()) for a in parsed if a}))
            correct_answers.append(len({"".join(a.split()) for a, good in zip(parsed, ok) if a and good}))
            d1.append(distinct_n([r.completion_ids for r in group], 1))
            d2.append(distinct_n([r.completion_ids for r in group], 2))
        metrics["diversity/distinct_answers"] = sum(answers) / len(answers)
        metrics["diversity/distinct_correct_answers"] = sum(correct_answers) / len(correct_answers)
        metrics["diversity/distinct_1"] = sum(d1) / len(d1)
        metrics["diversity/distinct_2"] = sum(d2) / len(d2)
        for name, value in metrics.items():
            self.record(name, value)

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
    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        """−mean_i (R_i − b·π/q) log π(x_i) over the micro-batch (`objectives.bayes.pseudo_reward_loss`)."""
        cfg = self.config
        mask = batch["completion_mask"].float()
        token_logp, _ = self.policy_logprobs(model, batch)
        log_pi = (token_logp * mask).sum(-1)
        metrics: dict[str, Any] = {}
        if cfg.proposal == "online" and "engine_logprobs" in batch:
            metrics["sampling/logp_difference_mean"] = self.engine_mismatch(token_logp, batch)
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
        finite = log_z.isfinite()
        metrics["bayes/pseudo_reward_mean"] = reward[finite].mean() if finite.any() else 0.0
        metrics["bayes/advantage_abs_mean"] = advantage.abs().mean()
        return LossOutput(loss.to(log_pi.dtype), metrics)

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


def _nanmean(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of the finite `values` where `keep` (nan when none)."""
    chosen = values[keep & values.isfinite()]
    return chosen.mean() if chosen.numel() else torch.tensor(float("nan"))
