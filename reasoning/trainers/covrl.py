"""CoVRL — Coupled Variational RL (Wen et al., arXiv 2512.12576) and the verifier-free reward family.

One set of weights plays three roles by prompt template (`data/templates.py`): the prior
p_φ(z|x) (question only), the posterior q_ψ(z|x, y*) (the reference answer y* as a hint in the
prompt) and the decoder p_θ(y*|x, z) (y* appended after the trace, scored under the prior
prompt). The trainer maximises the ELBO E_{p′}[log p_θ(y*|x, z)] − KL(p′ ‖ p_φ) with the
composite policy p′(z_t|·) = w p_φ(z_t|·) + (1 − w) q_ψ(z_t|·) (w = ½ in the paper):

- hybrid sampling: each rollout (or each prompt group, `sampling_level: group`) is generated from
  the prior prompt with probability α, else from the posterior prompt;
- both template passes (prior and posterior prompt over the same completion tokens) run as one
  batched forward; log p′_t = logsumexp(log w + ℓp_t, log(1 − w) + ℓq_t);
- reward R = log p_θold(y*|x, z): the trace is cut at the answer marker (a token boundary,
  `rewards.likelihood.cut_trace`), the answer prefix and y* are appended and scored by the old policy
  under the prior prompt (EOS not scored); completions without a marker and truncated ones are
  excluded (Â = 0) by default;
- advantage Â = R − mean of the group (optionally std-normalised);
- loss = clipped surrogate on p′ (ε = 0.3; ratio p′_θ / p_behaviour,old, the old prior's
  probability for prior-sampled rows and the old posterior's for posterior-sampled ones)
  + kl_coef · KL(p′ ‖ p_φ) (per-token unbiased estimator, skipped on truncated samples)
  + selective NLL of the prior on prior-sampled, well-formed samples with Â > 0; the policy terms
  cover the trace and its answer marker, reduced per token then per sequence (`loss_type: grpo`);
- `reward:` swaps in the verifier-free baselines — verifree, rlpr, jepo, nover, latro — or the
  usual correctness reward (`verifier`). With α = 1 (and then, by default, w = 1: the policy is the
  prior alone, the KL term vanishes and the posterior pass is skipped) each reproduces its method
  under otherwise identical settings, with the reductions, weights and defaults of its released
  trainer where one exists (docs/covrl.md): VeriFree and LaTRO sum the policy term over the trace
  (`loss_type: sum`), RLPR std-normalises advantages and filters groups by an EMA bound, NOVER
  ranks with a log10 length normaliser.

The mathematics lives in `objectives/covrl.py`, `objectives/policy.py` and `rewards/likelihood.py`;
this file holds the sampling and the orchestration.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from reasoning.data.templates import add_posterior_prompts, encode
from reasoning.models.scoring import final_states, span_token_logprobs, states_token_logprobs
from reasoning.objectives.covrl import (
    behaviour_logprobs,
    composite_clipped_surrogate,
    composite_kl,
    composite_logprobs,
    nll_selection,
    sample_sources,
    selective_nll,
)
from reasoning.objectives.logprobs import masked_mean, masked_sum
from reasoning.objectives.policy import aggregate_loss, clipped_surrogate
from reasoning.objectives.variational import normalized_weights
from reasoning.rewards.likelihood import (
    MISSING_ANSWER,
    RLPRStdFilter,
    TraceCut,
    answer_layout,
    answer_logprob,
    cut_trace,
    group_reward_std,
    jensen_bound,
    latro_reward,
    mean_token_probability,
    nover_reward,
    rlpr_reward,
    rlpr_std_filter,
    truncated_value,
    verifree_answer_nll,
    verifree_reward,
)
from reasoning.rollout import Rollout
from reasoning.trainers.base import RolloutTrainer, RolloutTrainerConfig, is_peft_model

REWARDS = ("covrl", "verifree", "rlpr", "jepo", "nover", "latro", "verifier")
SOURCES = ("prior", "posterior")
LOSS_TYPES = ("grpo", "token_mean", "dr_grpo", "sum")
# `loss_type` -> `policy.aggregate_loss` reduction
AGGREGATION = {"grpo": "grpo", "token_mean": "token_mean", "dr_grpo": "dr_grpo", "sum": "sequence_sum"}
# rewards that are probabilities (p(y*|x,z) = 0 is reward 0) and log-likelihoods (log 0 = −∞)
PROBABILITY_REWARDS = ("verifree", "rlpr", "nover")
LOG_REWARDS = ("covrl", "jepo", "latro")
# verl's GRPO normalisation in the released RLPR trainer: Â = (r − mean)/(std + 1e-6), 0 where std < 1e-6
RLPR_STD_EPS = 1e-6


@dataclass
class CoVRLConfig(RolloutTrainerConfig):
    """The `covrl:` section of a recipe."""

    reward: str = field(
        default="covrl",
        metadata={
            "help": "Training reward: covrl (log p(y*|x,z)), verifree, rlpr, jepo, nover, latro, or verifier "
            "(the reward functions of the `reward:` section). With a likelihood reward those functions "
            "are only logged."
        },
    )
    alpha: float = field(
        default=0.5,
        metadata={"help": "Hybrid sampling: probability that a trajectory is sampled from the prior prompt."},
    )
    sampling_level: str = field(
        default="rollout",
        metadata={"help": "Draw the source per rollout (rollout) or once per prompt group (group)."},
    )
    composite_weight: float | None = field(
        default=None,
        metadata={
            "help": "Prior weight w in p′ = w·p_φ + (1−w)·q_ψ (paper: ½). Default ½, or 1 when alpha = 1 "
            "(the policy is then the prior alone: no KL, no posterior pass, as in the baselines)."
        },
    )
    epsilon: float = field(default=0.3, metadata={"help": "Lower clipping range ε_low of the surrogate."})
    epsilon_high: float | None = field(default=None, metadata={"help": "Upper clipping range (default ε)."})
    ratio_to: str = field(
        default="behaviour",
        metadata={
            "help": "Ratio denominator: behaviour (old prior / old posterior by source, methods file) or "
            "composite (old p′, the plain PPO ratio)."
        },
    )
    scale_advantages: str | None = field(
        default=None,
        metadata={
            "help": "Advantage scale after the group baseline: none, group (std) or batch (std). "
            "Default: group for rlpr (its released trainer, eps 1e-6, groups with std < 1e-6 get 0), "
            "none otherwise."
        },
    )
    baseline: str | None = field(
        default=None,
        metadata={"help": "mean (group mean) or rloo (leave-one-out). Default: rloo for verifree and latro."},
    )
    kl_coef: float = field(
        default=1.0, metadata={"help": "Coefficient of the KL(p′ ‖ p_φ) loss term (1 = the ELBO's weight)."}
    )
    kl_weighting: str = field(
        default="token",
        metadata={"help": "KL estimator weight: token (p′/s per token, methods file) or sequence (prefix)."},
    )
    nll_coef: float | None = field(
        default=None,
        metadata={
            "help": "Selective NLL (prior-sampled, well-formed, Â > 0) coefficient: CoVRL's third loss term. "
            "Default: 0.1 for covrl, 0 for the baselines (their released trainers have no such term)."
        },
    )
    answer_nll_coef: float | None = field(
        default=None,
        metadata={
            "help": "Decoder term −w·log p(y*|x,z) (weights: R for verifree, self-normalised for jepo, 1 "
            "otherwise). Default: 1 for verifree and jepo, 0 otherwise."
        },
    )
    answer_reduction: str = field(
        default="sum",
        metadata={"help": "covrl/jepo reward: sum (log p(y*|x,z)) or mean (per answer token)."},
    )
    truncated_reward: Any = field(
        default=None,
        metadata={
            "help": 'Reward of truncated samples: "none" (excluded from the group, Â = 0), "score" (kept '
            "as scored) or a number. Default: 0 for verifree (p = 0, kept in the RLOO group) and nover "
            '(format-invalid: 0), "score" for rlpr (as their released trainers), "none" otherwise.'
        },
    )
    missing_answer: str | None = field(
        default=None,
        metadata={
            "help": "Completions without an answer marker: zero (p(y*|x,z) = 0: reward 0, kept in the group), "
            "exclude (no reward, Â = 0) or score (y* scored after the whole completion). Default: zero "
            "for verifree, rlpr, nover; exclude for covrl, jepo, latro (log 0 = −inf has no finite "
            "advantage, so zero is refused there)."
        },
    )
    score_eos: bool = field(
        default=False,
        metadata={
            "help": "Score EOS after y* in the likelihood rewards (the released VeriFree, RLPR, NOVER and "
            "variational-reasoning code do not)."
        },
    )
    policy_tokens: str = field(
        default="trace",
        metadata={
            "help": "Tokens under the surrogate and KL: trace (up to and including the answer marker; the "
            "whole completion when it has none) or completion (every generated token)."
        },
    )
    loss_type: str | None = field(
        default=None,
        metadata={
            "help": "Token aggregation: grpo (mean over tokens, then sequences), token_mean, dr_grpo, sum "
            "(sum over each trace, then mean over sequences: the released VeriFree and LaTRO trainers). "
            "Default: sum for verifree and latro, grpo otherwise."
        },
    )
    hint_column: str = field(
        default="answer", metadata={"help": "Column shown as the hint in the posterior prompt."}
    )
    answer_column: str = field(default="answer", metadata={"help": "Column holding the reference answer y*."})
    hint_after: bool = field(
        default=False, metadata={"help": "Posterior prompt states the answer first, then asks for the trace."}
    )
    latro_beta: float = field(default=0.05, metadata={"help": "LaTRO: β of the log(q/π₀) penalty."})
    rlpr_debias: bool = field(
        default=True, metadata={"help": "RLPR: subtract the no-trace mean token probability."}
    )
    rlpr_format_coef: float = field(
        default=0.1,
        metadata={
            "help": "RLPR: reward = (1 − c)·probability term + c·format check (released trainer: 0.1)."
        },
    )
    rlpr_std_filter: bool = field(
        default=True,
        metadata={"help": "RLPR: drop groups whose reward std is below β × EMA of the mean group std."},
    )
    rlpr_std_filter_beta: float = field(
        default=0.5,
        metadata={"help": "RLPR: β of the std bound (released scripts: 0.5 Qwen, 0.9 Llama, 1.0 Gemma)."},
    )
    rlpr_filter_momentum: float = field(
        default=0.99, metadata={"help": "RLPR: momentum of the EMA of the mean group std."}
    )
    rlpr_filter_ema_start: int = field(
        default=6,
        metadata={"help": "RLPR: first generation (1-based) whose mean group std seeds the EMA."},
    )
    rlpr_filter_start: int = field(
        default=11,
        metadata={
            "help": "RLPR: first generation that is filtered; the EMA starts as the mean over generations "
            "rlpr_filter_ema_start .. rlpr_filter_start − 1."
        },
    )
    nover_log_base: float = field(
        default=10.0,
        metadata={
            "help": "NOVER: base of the log in the length normaliser max(1, 1 + log |z|) (released code: 10)."
        },
    )
    scoring_batch_size: int = field(
        default=64, metadata={"help": "Sequences per forward when scoring the reference answer."}
    )

    def __post_init__(self) -> None:
        _one_of("reward", self.reward, REWARDS)
        if self.scale_advantages is None:
            self.scale_advantages = "group" if self.reward == "rlpr" else "none"
        if self.loss_type is None:
            self.loss_type = "sum" if self.reward in ("verifree", "latro") else "grpo"
        if self.truncated_reward is None:
            self.truncated_reward = {"verifree": 0.0, "nover": 0.0, "rlpr": "score"}.get(self.reward, "none")
        if self.missing_answer is None:
            self.missing_answer = "zero" if self.reward in PROBABILITY_REWARDS else "exclude"
        _one_of("sampling_level", self.sampling_level, ("rollout", "group"))
        _one_of("ratio_to", self.ratio_to, ("behaviour", "composite"))
        _one_of("scale_advantages", self.scale_advantages, ("none", "group", "batch"))
        _one_of("kl_weighting", self.kl_weighting, ("token", "sequence"))
        _one_of("answer_reduction", self.answer_reduction, ("sum", "mean"))
        _one_of("policy_tokens", self.policy_tokens, ("trace", "completion"))
        _one_of("loss_type", self.loss_type, LOSS_TYPES)
        _one_of("missing_answer", self.missing_answer, MISSING_ANSWER)
        if self.missing_answer == "zero" and self.reward in LOG_REWARDS:
            raise ValueError(
                f"missing_answer zero gives the {self.reward} reward log p(y*|x,z) = log 0 = -inf, which has "
                "no finite advantage; use exclude or score"
            )
        if not 0.0 <= self.rlpr_format_coef <= 1.0:
            raise ValueError(f"rlpr_format_coef must be in [0, 1], got {self.rlpr_format_coef}")
        if not 1 <= self.rlpr_filter_ema_start < self.rlpr_filter_start:
            raise ValueError(
                "rlpr_filter_ema_start must be >= 1 and below rlpr_filter_start, got "
                f"{self.rlpr_filter_ema_start} and {self.rlpr_filter_start}"
            )
        if self.rlpr_std_filter_beta < 0 or not 0.0 <= self.rlpr_filter_momentum < 1.0:
            raise ValueError(
                "rlpr_std_filter_beta must be >= 0 and rlpr_filter_momentum in [0, 1), got "
                f"{self.rlpr_std_filter_beta} and {self.rlpr_filter_momentum}"
            )
        if self.nover_log_base <= 1.0:
            raise ValueError(
                f"nover_log_base must be > 1 (10, or e for the natural log), got {self.nover_log_base}"
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.composite_weight is None:
            self.composite_weight = 1.0 if self.alpha == 1.0 else 0.5
        if not 0.0 < self.composite_weight <= 1.0:
            raise ValueError(f"composite_weight must be in (0, 1], got {self.composite_weight}")
        if self.baseline is None:
            self.baseline = "rloo" if self.reward in ("verifree", "latro") else "mean"
        _one_of("baseline", self.baseline, ("mean", "rloo"))
        if self.nll_coef is None:
            self.nll_coef = 0.1 if self.reward == "covrl" else 0.0
        if self.answer_nll_coef is None:
            self.answer_nll_coef = 1.0 if self.reward in ("verifree", "jepo") else 0.0
        if self.epsilon <= 0:
            raise ValueError(f"epsilon must be > 0, got {self.epsilon}")
        if self.truncated_reward not in ("none", "score"):
            value = truncated_value(self.truncated_reward)
            if not math.isfinite(value):
                raise ValueError(
                    f'truncated_reward must be "none", "score" or a finite number, got {self.truncated_reward!r}'
                )
        if self.baseline == "rloo" and self.num_generations < 2:
            raise ValueError("the rloo baseline needs num_generations >= 2")


def _one_of(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} {value!r} is not one of {', '.join(choices)}")


def group_baseline_advantages(
    rewards: torch.Tensor,
    group_size: int,
    baseline: str = "mean",
    scale: str = "none",
    eps: float = 1e-4,
    min_std: float = 0.0,
) -> torch.Tensor:
    """Group-relative advantages with NaN rewards left out, `[N] -> [N]` (N = groups × group_size).

    Â_i = (r_i − mean_j r_j) over the group's valid (non-NaN) entries, times n/(n − 1) for the
    leave-one-out baseline (`rloo`: r_i − mean_{j≠i} r_j), divided by the group's or the batch's
    std of valid rewards (+ eps) when `scale` says so; with `scale="group"`, groups whose std is
    below `min_std` get Â = 0 (verl's GRPO, used by the released RLPR trainer, with 1e-6). NaN
    entries (samples excluded from their group) get Â = 0 and do not move their group's baseline.
    """
    grouped = rewards.view(-1, group_size)
    valid = ~torch.isnan(grouped)
    count = valid.sum(dim=1, keepdim=True).to(rewards.dtype)
    mean = torch.where(valid, grouped, torch.zeros_like(grouped)).sum(dim=1, keepdim=True) / count.clamp(
        min=1
    )
    centred = torch.where(valid, grouped - mean, torch.zeros_like(grouped))
    if baseline == "rloo":
        centred = centred * torch.where(count > 1, count / (count - 1).clamp(min=1), torch.zeros_like(count))
    elif baseline != "mean":
        raise ValueError(f"baseline must be mean or rloo, got {baseline!r}")
    if scale == "group":
        std = torch.nan_to_num(group_reward_std(rewards, group_size), nan=0.0).unsqueeze(1)
        centred = torch.where(std < min_std, torch.zeros_like(centred), centred / (std + eps))
    elif scale == "batch":
        finite = rewards[~torch.isnan(rewards)]
        centred = centred / ((finite.std() if finite.numel() > 1 else 0.0) + eps)
    elif scale != "none":
        raise ValueError(f"scale must be none, group or batch, got {scale!r}")
    return centred.reshape(-1)


class CoVRLTrainer(RolloutTrainer):
    """CoVRL and the verifier-free baselines on engine rollouts (see the module docstring)."""

    config: CoVRLConfig
    # likelihood rewards need no reward function; `verifier` checks for one in __init__
    needs_rewards = False

    def __init__(self, *args: Any, ref_model: torch.nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.config
        if cfg.reward == "verifier" and not self.reward_funcs:
            raise ValueError("covrl.reward = verifier needs at least one reward function (reward.functions)")
        self.ref_model = ref_model
        peft = is_peft_model(self.accelerator.unwrap_model(self.model))
        if cfg.reward == "latro" and ref_model is None and not peft:
            self.ref_model = self.policy_copy()  # under ZeRO-3: a partitioned inference engine
        self.rlpr_filter = RLPRStdFilter(
            beta=cfg.rlpr_std_filter_beta,
            momentum=cfg.rlpr_filter_momentum,
            ema_start=cfg.rlpr_filter_ema_start,
            filter_start=cfg.rlpr_filter_start,
        )
        self.rlpr_threshold = 0.0  # the last generation's std bound (0: not filtering yet)
        tokenizer = self.processing_class
        self._marker_ids = encode(tokenizer, self.template.answer_prefix)
        self._stop_ids = {tokenizer.eos_token_id, *self.sampling.stop_token_ids} - {None}

    # ------------------------------------------------------------------ data
    def _prepare_prompts(self, dataset: Dataset, tokenizer: PreTrainedTokenizerBase) -> Dataset:
        """Prior prompts (the base) plus the posterior prompt with the hint, as text and ids."""
        cfg, template = self.config, self.template
        for column in {cfg.hint_column, cfg.answer_column}:
            if column not in dataset.column_names:
                raise ValueError(
                    f"covrl needs the column {column!r} in the training data; it has {dataset.column_names}"
                )
        dataset = super()._prepare_prompts(dataset, tokenizer)
        return add_posterior_prompts(
            dataset, template, tokenizer, cfg.hint_column, cfg.hint_after, cfg.max_prompt_length
        )

    # ------------------------------------------------------------------ hybrid sampling
    def hybrid_sources(self, num_groups: int) -> torch.Tensor:
        """Which rollouts the prior samples, `bool [num_groups, G]`, seeded by the step (a resume repeats it).

        Drawn for the global generation batch and sliced to this rank's groups, so a prompt's sources
        do not depend on the number of ranks.
        """
        seed = self.args.seed + 7919 * self.state.global_step
        generator = torch.Generator().manual_seed(seed)
        size, world = self.config.num_generations, self.args.world_size
        cfg = self.config
        flags = sample_sources(num_groups * world, size, cfg.alpha, cfg.sampling_level, generator)
        first = self.args.process_index * num_groups
        return flags.view(num_groups * world, size)[first : first + num_groups]

    def generate(self, rows: list[dict[str, Any]]) -> list[list[Rollout]]:
        """G rollouts per prompt, each from the prior or the posterior prompt as `hybrid_sources` says.

        Always one engine call (each call costs a full decoding loop, which dominates on small
        models). When every group has a single source (per-group sampling, α ∈ {0, 1}) the call
        takes one prompt per group with n = G and the group's seed (`prompt_seeds`), as the base
        does. Otherwise it takes one prompt per rollout with n = 1, rollout j of a group seeded with
        the group's seed + j (what vLLM gives the j-th of n samples): distinct seeds, since a request
        seeded alike would repeat its sample for identical prompts.
        Each rollout carries `extra["from_prior"]`; within a group the rollouts keep the drawn positions.
        """
        self.sync_engine()
        start = time.monotonic()
        sources = self.hybrid_sources(len(rows))
        keys = {True: "prompt_ids", False: "posterior_prompt_ids"}
        sampling = self.generation_sampling()
        seeds = self.prompt_seeds(len(rows))
        size = self.config.num_generations
        if bool((sources == sources[:, :1]).all()):
            prompts = [row[keys[bool(flags[0])]] for row, flags in zip(rows, sources)]
            groups = self.engine.generate(prompts, sampling, n=size, seeds=seeds)
        else:
            prompts = [row[keys[flag]] for row, flags in zip(rows, sources.tolist()) for flag in flags]
            if seeds is not None:
                seeds = [seed + j for seed in seeds for j in range(size)]
            flat = [group[0] for group in self.engine.generate(prompts, sampling, n=1, seeds=seeds)]
            groups = [flat[i * size : (i + 1) * size] for i in range(len(rows))]
        for i, (group, flags) in enumerate(zip(groups, sources.tolist())):
            for rollout, from_prior in zip(group, flags):
                rollout.extra["from_prior"] = from_prior
                rollout.prompt_index = i
        self._metrics["time/generation"].append(time.monotonic() - start)
        return [list(group) for group in groups]

    # ------------------------------------------------------------------ batch
    def cut(self, rollout: Rollout) -> TraceCut:
        """The completion cut before its first answer marker (`likelihood.cut_trace`, stop token dropped).

        Without a marker the whole completion (minus the stop token) is the trace; what such a
        completion gets is `missing_answer` (y* is appended after it all the same, for `score`).
        """
        return cut_trace(rollout.completion_ids, self._marker_ids, self._stop_ids, rollout.truncated)

    def _well_formed(self, rollout: Rollout) -> bool:
        _, answer = self.template.split_completion(rollout.text)
        return not rollout.truncated and bool(answer and answer.strip())

    def _reuses_batch(self) -> bool:
        return super().needs_old_logprobs()

    def needs_old_logprobs(self) -> bool:
        # The old prior and posterior passes are stored by build_batch itself (two tensors, not one).
        return False

    def needs_posterior_pass(self) -> bool:
        """The posterior template is scored unless p′ is the prior alone and nothing was posterior-sampled."""
        return self.config.composite_weight < 1.0 or self.config.alpha < 1.0

    def build_batch(
        self, rows: list[dict[str, Any]], groups: list[list[Rollout]], rewards: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        cfg = self.config
        batch = self.collate_rollouts(groups)
        rollouts = [r for group in groups for r in group]
        row_of = [i for i, group in enumerate(groups) for _ in group]
        n, width = batch["completion_ids"].shape
        prior_prompts = [list(rows[i]["prompt_ids"]) for i in row_of]
        posterior_prompts = [list(rows[i]["posterior_prompt_ids"]) for i in row_of]
        batch.update(self._pad_prompts(prior_prompts, posterior_prompts))
        batch["from_prior"] = torch.tensor([bool(r.extra["from_prior"]) for r in rollouts])
        batch["well_formed"] = torch.tensor([self._well_formed(r) for r in rollouts])
        cuts = [self.cut(r) for r in rollouts]
        batch["missing_answer"] = torch.tensor([c.missing for c in cuts])
        # RLPR's and NOVER's format check: one answer marker, a non-empty answer, not truncated
        batch["format_ok"] = batch["well_formed"] & torch.tensor([c.marker_count == 1 for c in cuts])
        trace_lengths = torch.tensor([len(c.trace) for c in cuts])
        policy_lengths = torch.tensor([c.policy_length for c in cuts])
        positions = torch.arange(width).unsqueeze(0)
        batch["trace_mask"] = (positions < policy_lengths.unsqueeze(1)).long() * batch["completion_mask"]
        batch["policy_mask"] = (
            batch["trace_mask"] if cfg.policy_tokens == "trace" else batch["completion_mask"]
        )

        # Old policy: both template passes when the batch outlives this step (or LaTRO needs log q(z|x)).
        old = None
        if self._reuses_batch() or cfg.reward == "latro":
            old = self._passes_without_grad(self.model, batch, posterior=self.needs_posterior_pass())
            batch["old_prior_logprobs"] = old[0]
            if old[1] is not None:
                batch["old_posterior_logprobs"] = old[1]
        if not self._reuses_batch():
            batch.pop("old_prior_logprobs", None)
            batch.pop("old_posterior_logprobs", None)

        # The reference answer after each trace, scored by the old policy under the prior prompt.
        answers = [str(rows[i][cfg.answer_column]) for i in row_of]
        scored = [
            answer_layout(self.template, self.processing_class, prompt, cut.trace, answer, cfg.score_eos)
            for prompt, cut, answer in zip(prior_prompts, cuts, answers)
        ]
        start = time.monotonic()
        answer_logp, answer_mask = self._answer_logprobs(scored)
        truncated = batch["truncated"]
        total = self._training_reward(
            rows, rewards, answer_logp, answer_mask, truncated, trace_lengths, old, batch
        )
        self._metrics["time/answer_scoring"].append(time.monotonic() - start)
        # on every rank's rewards: `batch` scaling and the RLPR threshold use the global batch
        everyone, mine = self.gather_generation(total)
        std_eps = dict(eps=RLPR_STD_EPS, min_std=RLPR_STD_EPS) if cfg.reward == "rlpr" else {}
        advantages = group_baseline_advantages(
            everyone, cfg.num_generations, baseline=cfg.baseline, scale=cfg.scale_advantages, **std_eps
        )[mine]
        if cfg.reward == "rlpr" and cfg.rlpr_std_filter:
            # the bound of this generation, then this generation's stds (all groups, all ranks) for the next
            bound = self.rlpr_filter.begin_step()
            self.rlpr_filter.record(group_reward_std(everyone, cfg.num_generations))
            self.rlpr_threshold = 0.0 if bound is None else bound
            if bound is not None:
                keep = rlpr_std_filter(total, cfg.num_generations, bound)
                self.record("rlpr/kept_fraction", keep.float().mean())
                self.record("rlpr/threshold", bound)
                advantages = advantages * keep
        batch["advantages"] = advantages
        if cfg.answer_nll_coef > 0:
            batch.update(self._answer_tensors(scored))
            batch["answer_weights"] = self._answer_weights(total, answer_logp, answer_mask, truncated)
        valid = ~torch.isnan(total)
        batch["training_rewards"] = total
        # The base logs `rewards` (mean, group std): truncated samples show their group's mean there.
        grouped = total.view(-1, cfg.num_generations)
        fill = torch.nan_to_num(torch.nanmean(grouped, dim=1, keepdim=True), nan=0.0).expand_as(grouped)
        batch["rewards"] = torch.where(valid.view_as(grouped), grouped, fill).reshape(-1)
        self._record_generation(batch, rewards, answer_logp, answer_mask, trace_lengths)
        return batch

    def _pad_prompts(self, prior: list[list[int]], posterior: list[list[int]]) -> dict[str, torch.Tensor]:
        """Prior and posterior prompts left-padded to one common width (so one forward takes both)."""
        pad = self.processing_class.pad_token_id or 0
        width = max(len(p) for p in prior + posterior)
        out = {}
        for name, prompts in (("prompt", prior), ("posterior_prompt", posterior)):
            ids = torch.full((len(prompts), width), pad, dtype=torch.long)
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for i, p in enumerate(prompts):
                ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
                mask[i, width - len(p) :] = 1
            out[f"{name}_ids"], out[f"{name}_mask"] = ids, mask
        return out

    @torch.no_grad()
    def _answer_logprobs(self, scored: list) -> tuple[torch.Tensor, torch.Tensor]:
        """log p_θold(y*_t | x, z, y*_<t) `[N, A]` and its mask (temperature 1: the model's own likelihood)."""
        model = self.accelerator.unwrap_model(self.model)
        spans = span_token_logprobs(
            model,
            [s.ids for s in scored],
            [s.answer_start for s in scored],
            pad_id=self.processing_class.pad_token_id or 0,
            batch_size=self.config.scoring_batch_size,
        )
        width = max(max(len(s) for s in spans), 1)
        logp = torch.zeros((len(spans), width))
        mask = torch.zeros((len(spans), width), dtype=torch.long)
        for i, span in enumerate(spans):
            logp[i, : len(span)] = span
            mask[i, : len(span)] = 1
        return logp, mask

    def _training_reward(
        self,
        rows: list[dict[str, Any]],
        table: torch.Tensor,
        answer_logp: torch.Tensor,
        answer_mask: torch.Tensor,
        truncated: torch.Tensor,
        trace_lengths: torch.Tensor,
        old: tuple[torch.Tensor, torch.Tensor | None] | None,
        batch: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """The reward `[N]` that trains (NaN = not applicable: excluded by `truncated_reward` or `missing_answer`).

        Every likelihood reward gets the same cut (`cut`), the same answer span (`answer_layout`) and
        the same rules for missing markers and truncation (`flags`).
        """
        cfg = self.config
        flags = dict(
            truncated=truncated,
            truncated_reward=cfg.truncated_reward,
            missing=batch["missing_answer"],
            missing_answer=cfg.missing_answer,
        )
        if cfg.reward == "verifier":
            return self.combine_rewards(table)
        if cfg.reward == "covrl":
            return answer_logprob(answer_logp, answer_mask, cfg.answer_reduction, **flags)
        if cfg.reward == "jepo":
            reward = answer_logprob(answer_logp, answer_mask, cfg.answer_reduction, **flags)
            bound = jensen_bound(reward.view(-1, cfg.num_generations))
            if (~torch.isnan(bound)).any():
                self.record("jepo/bound", bound[~torch.isnan(bound)].mean())
            return reward
        if cfg.reward == "verifree":
            return verifree_reward(answer_logp, answer_mask, **flags)
        if cfg.reward == "nover":
            return nover_reward(
                answer_logp,
                answer_mask,
                cfg.num_generations,
                trace_lengths,
                format_ok=batch["format_ok"],
                log_base=cfg.nover_log_base,
                **flags,
            )
        if cfg.reward == "rlpr":
            no_trace = None
            if cfg.rlpr_debias:
                bare = [
                    answer_layout(
                        self.template,
                        self.processing_class,
                        list(row["prompt_ids"]),
                        [],
                        str(row[cfg.answer_column]),
                        cfg.score_eos,
                    )
                    for row in rows
                ]
                logp, mask = self._answer_logprobs(bare)
                no_trace = mean_token_probability(logp, mask).repeat_interleave(cfg.num_generations)
                self.record("rlpr/no_trace_probability", no_trace.mean())
            self.record("rlpr/format", batch["format_ok"].float().mean())
            return rlpr_reward(
                answer_logp,
                answer_mask,
                no_trace,
                format_ok=batch["format_ok"],
                format_coef=cfg.rlpr_format_coef,
                **flags,
            )
        # latro: log p(y*|x,z) − β (log q(z|x) − log π₀(z|x)) over the trace tokens
        assert old is not None
        trace_mask = batch["trace_mask"].float()
        trace_logp = masked_sum(old[0], trace_mask, dim=-1)
        if self.ref_model is None:  # a PEFT policy: π₀ is its base, run with the adapters disabled
            with self.accelerator.unwrap_model(self.model).disable_adapter():
                reference, _ = self._passes_without_grad(self.model, batch, posterior=False)
        else:
            reference, _ = self._passes_without_grad(self.ref_model, batch, posterior=False)
        reference_logp = masked_sum(reference, trace_mask, dim=-1)
        self.record("latro/trace_log_ratio", (trace_logp - reference_logp).mean())
        return latro_reward(answer_logp, answer_mask, trace_logp, reference_logp, cfg.latro_beta, **flags)

    def _answer_weights(
        self,
        total: torch.Tensor,
        answer_logp: torch.Tensor,
        answer_mask: torch.Tensor,
        truncated: torch.Tensor,
    ) -> torch.Tensor:
        """Per-sample weights of the decoder term −w_i log p(y*|x, z_i) (0 for truncated samples and
        for samples without a reward, e.g. an excluded missing marker)."""
        cfg = self.config
        off = truncated | torch.isnan(total)
        if cfg.reward == "verifree":  # ∇E[p(y*|x,z)] = E[p ∇log p]: weight R
            weights = torch.nan_to_num(total, nan=0.0)
        elif cfg.reward == "jepo":  # ∇ log (1/G) Σ_i p_i = Σ_i ρ̃_i ∇ log p_i, ρ̃ the group softmax
            log_likelihood = masked_sum(answer_logp, answer_mask, dim=-1)
            log_likelihood = torch.where(off, torch.full_like(log_likelihood, -math.inf), log_likelihood)
            grouped = log_likelihood.view(-1, cfg.num_generations)
            weights = torch.nan_to_num(normalized_weights(grouped) * cfg.num_generations, nan=0.0).reshape(-1)
        else:  # the ELBO's decoder gradient E[∇ log p(y*|x,z)]
            weights = torch.ones_like(total)
        return torch.where(off, torch.zeros_like(weights), weights)

    def _answer_tensors(self, scored: list) -> dict[str, torch.Tensor]:
        """Right-padded prompt + trace + y* sequences with a mask of the answer tokens (decoder term)."""
        pad = self.processing_class.pad_token_id or 0
        width = max(len(s.ids) for s in scored)
        ids = torch.full((len(scored), width), pad, dtype=torch.long)
        attention = torch.zeros((len(scored), width), dtype=torch.long)
        targets = torch.zeros((len(scored), width), dtype=torch.long)
        for i, s in enumerate(scored):
            ids[i, : len(s.ids)] = torch.tensor(s.ids, dtype=torch.long)
            attention[i, : len(s.ids)] = 1
            targets[i, s.answer_start : len(s.ids)] = 1
        return {"answer_ids": ids, "answer_attention": attention, "answer_targets": targets}

    def _record_generation(
        self,
        batch: dict[str, torch.Tensor],
        table: torch.Tensor,
        answer_logp: torch.Tensor,
        answer_mask: torch.Tensor,
        trace_lengths: torch.Tensor,
    ) -> None:
        """Generation metrics, overall and split by the source that sampled each trajectory."""
        total, truncated = batch["training_rewards"], batch["truncated"]
        log_likelihood = masked_sum(answer_logp, answer_mask, dim=-1)
        lengths = batch["completion_mask"].sum(dim=1).float()
        names = [getattr(f, "__name__", f"reward_{j}") for j, f in enumerate(self.reward_funcs)]
        self.record("hybrid/prior_fraction", batch["from_prior"].float().mean())
        self.record("trace_length", trace_lengths[~truncated].float().mean() if (~truncated).any() else 0.0)
        if (~truncated).any():
            self.record("answer_logprob", log_likelihood[~truncated].mean())
        self.record("well_formed", batch["well_formed"].float().mean())
        self.record("missing_answer", batch["missing_answer"].float().mean())
        for source, rows in (("prior", batch["from_prior"]), ("posterior", ~batch["from_prior"])):
            if not rows.any():
                continue
            valid = rows & ~torch.isnan(total)
            if valid.any():
                self.record(f"{source}/reward", total[valid].mean())
            if (rows & ~truncated).any():
                self.record(f"{source}/answer_logprob", log_likelihood[rows & ~truncated].mean())
            self.record(f"{source}/length", lengths[rows].mean())
            self.record(f"{source}/truncated", truncated[rows].float().mean())
            self.record(f"{source}/well_formed", batch["well_formed"][rows].float().mean())
            for j, name in enumerate(names):
                values = table[rows, j]
                values = values[~torch.isnan(values)]
                if len(values):
                    self.record(f"{source}/rewards/{name}", values.mean())

    # ------------------------------------------------------------------ passes and loss
    def template_passes(
        self,
        model: torch.nn.Module,
        batch: dict[str, torch.Tensor],
        posterior: bool = True,
        answer: bool = False,
    ) -> dict[str, torch.Tensor]:
        """One forward over [prior rows; posterior rows; answer rows], per-token log-probs of each.

        Returns `prior` `[B, T]` (log p_φ of the completion tokens under the prior prompt),
        `posterior` `[B, T]` (the same tokens under the posterior prompt, when `posterior`), both at
        the sampling temperature, and with `answer` the reference answer's token log-probs
        `answer` `[B, L′]` with its mask `answer_mask` (temperature 1, aligned with the answer rows'
        ids shifted by one). Rows are left-padded
        (templates) or right-padded (answers) to one width; positions use the model's defaults,
        which rotary models make shift-invariant.
        """
        device = next(model.parameters()).device
        completion = batch["completion_ids"].to(device)
        completion_mask = batch["completion_mask"].to(device)
        size, steps = completion.shape
        ids = [torch.cat([batch["prompt_ids"].to(device), completion], dim=1)]
        masks = [torch.cat([batch["prompt_mask"].to(device), completion_mask], dim=1)]
        if posterior:
            ids.append(torch.cat([batch["posterior_prompt_ids"].to(device), completion], dim=1))
            masks.append(torch.cat([batch["posterior_prompt_mask"].to(device), completion_mask], dim=1))
        template_width = ids[0].shape[1]
        width = template_width
        if answer:
            width = max(width, batch["answer_ids"].shape[1])
        pad = self.processing_class.pad_token_id or 0
        rows_ids, rows_mask = [], []
        for x, m in zip(ids, masks):
            left = width - template_width
            rows_ids.append(torch.nn.functional.pad(x, (left, 0), value=pad))
            rows_mask.append(torch.nn.functional.pad(m, (left, 0), value=0))
        if answer:
            right = width - batch["answer_ids"].shape[1]
            rows_ids.append(torch.nn.functional.pad(batch["answer_ids"].to(device), (0, right), value=pad))
            rows_mask.append(
                torch.nn.functional.pad(batch["answer_attention"].to(device), (0, right), value=0)
            )
        input_ids, attention = torch.cat(rows_ids), torch.cat(rows_mask)
        # hidden states, or logits under ZeRO-3 (the head weight is a partition outside the forward)
        unwrapped = self.accelerator.unwrap_model(model)
        states, head, _ = final_states(model, unwrapped, input_ids, attention, width)
        temperature = self.sampling.temperature if self.sampling.temperature > 0 else 1.0
        templates = len(ids)
        # position t's state predicts token t + 1
        logp, _ = states_token_logprobs(
            states[: templates * size, width - steps - 1 : width - 1],
            head,
            completion.repeat(templates, 1),
            temperature=temperature,
            chunk_size=self.config.logprob_chunk_size,
        )
        result = {"prior": logp[:size]}
        if posterior:
            result["posterior"] = logp[size:]
        if answer:
            answer_ids = input_ids[templates * size :]
            result["answer"], _ = states_token_logprobs(
                states[templates * size :, :-1],
                head,
                answer_ids[:, 1:],
                chunk_size=self.config.logprob_chunk_size,
            )
            targets = batch["answer_targets"].to(device)
            result["answer_mask"] = torch.nn.functional.pad(targets, (0, width - targets.shape[1]))[:, 1:]
        return result

    @torch.no_grad()
    def _passes_without_grad(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], posterior: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prior (and posterior) per-token log-probs of the whole generation, micro-batch by micro-batch."""
        prior, post = [], []
        step = self.args.per_device_train_batch_size
        for start in range(0, batch["completion_ids"].shape[0], step):
            part = {
                k: v[start : start + step] for k, v in batch.items() if torch.is_tensor(v) and v.dim() > 0
            }
            passes = self.template_passes(model, part, posterior=posterior)
            prior.append(passes["prior"].cpu())
            if posterior:
                post.append(passes["posterior"].cpu())
        return torch.cat(prior), (torch.cat(post) if posterior else None)

    def loss_terms(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-token surrogate and KL `[B, T]` (with their masks), the scalar NLL and decoder terms, and
        the composite, prior, posterior and behaviour log-probs they were computed from."""
        cfg = self.config
        weight = cfg.composite_weight
        with_answer = cfg.answer_nll_coef > 0
        passes = self.template_passes(model, batch, posterior=self.needs_posterior_pass(), answer=with_answer)
        prior = passes["prior"]
        posterior = passes.get("posterior", prior)
        device = prior.device
        old_prior = batch.get("old_prior_logprobs")
        old_prior = prior.detach() if old_prior is None else old_prior.to(device)
        old_posterior = batch.get("old_posterior_logprobs")
        old_posterior = posterior.detach() if old_posterior is None else old_posterior.to(device)
        from_prior = batch["from_prior"].to(device)
        advantages = batch["advantages"].to(device)
        policy_mask = batch["policy_mask"].to(device).float()
        composite = composite_logprobs(prior, posterior, weight)
        behaviour = behaviour_logprobs(old_prior, old_posterior, from_prior)
        eps = dict(eps_low=cfg.epsilon, eps_high=cfg.epsilon_high, mask=policy_mask)
        if cfg.ratio_to == "behaviour" or weight == 0.5:
            surrogate, stats = composite_clipped_surrogate(
                composite, old_prior, old_posterior, from_prior, advantages, ratio_to=cfg.ratio_to, **eps
            )
            denominator = (
                behaviour if cfg.ratio_to == "behaviour" else composite_logprobs(old_prior, old_posterior)
            )
        else:  # the plain PPO ratio of p′ with w ≠ ½
            denominator = composite_logprobs(old_prior, old_posterior, weight)
            surrogate, stats = clipped_surrogate(composite, denominator.detach(), advantages, **eps)
        kl_mask = policy_mask * (~batch["truncated"].to(device)).unsqueeze(1).float()
        if weight < 1.0 and cfg.kl_coef > 0:
            kl = composite_kl(composite, prior, behaviour, mask=kl_mask, weighting=cfg.kl_weighting)
        else:  # p′ = p_φ: the KL is identically 0
            kl = torch.zeros_like(composite)
        completion_mask = batch["completion_mask"].to(device).float()
        selected = nll_selection(from_prior, batch["well_formed"].to(device), advantages)
        nll = (
            selective_nll(prior, completion_mask, selected, coef=1.0)
            if cfg.nll_coef > 0
            else prior.new_zeros(())
        )
        decoder = prior.new_zeros(())
        if with_answer:
            weights = batch["answer_weights"].to(device)
            decoder = verifree_answer_nll(passes["answer"], passes["answer_mask"], weights)
        return {
            "surrogate": surrogate,
            "kl": kl,
            "policy_mask": policy_mask,
            "kl_mask": kl_mask,
            "nll": nll,
            "nll_selected": selected,
            "answer_nll": decoder,
            "composite": composite,
            "prior": prior,
            "posterior": posterior,
            "behaviour": behaviour,
            "ratio": torch.exp(composite.detach() - denominator.detach()),
            "clip_stats": stats,
        }

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg = self.config
        terms = self.loss_terms(model, batch)
        mask = terms["policy_mask"]
        per_token = terms["surrogate"] + cfg.kl_coef * terms["kl"]
        policy = aggregate_loss(
            per_token, mask, AGGREGATION[cfg.loss_type], max_completion_length=self.sampling.max_tokens
        )
        total = policy + cfg.nll_coef * terms["nll"] + cfg.answer_nll_coef * terms["answer_nll"]
        self._record_loss(batch, terms)
        accumulation = getattr(
            self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps
        )
        return total / (accumulation if model.training else 1)

    @torch.no_grad()
    def _record_loss(self, batch: dict[str, torch.Tensor], terms: dict[str, Any]) -> None:
        mask, kl_mask = terms["policy_mask"], terms["kl_mask"]
        self.record("loss/surrogate", masked_mean(terms["surrogate"].detach(), mask))
        self.record("kl", masked_mean(terms["kl"].detach(), kl_mask))
        self.record("loss/nll", terms["nll"].detach())
        self.record("loss/answer_nll", terms["answer_nll"].detach())
        self.record("nll/selected_fraction", terms["nll_selected"].float().mean())
        for name, value in terms["clip_stats"].items():
            self.record(f"clip_ratio/{name}", value)
        if "engine_logprobs" in batch:
            completion_mask = batch["completion_mask"].to(mask.device).float()
            engine = batch["engine_logprobs"].to(mask.device)
            self.record(
                "sampling/logp_difference_mean",
                masked_mean((terms["behaviour"] - engine).abs(), completion_mask),
            )
        from_prior = batch["from_prior"].to(mask.device)
        for source, rows in (("prior", from_prior), ("posterior", ~from_prior)):
            if not rows.any():
                continue
            row_mask = rows.unsqueeze(1).float()
            if (kl_mask * row_mask).sum() > 0:
                self.record(f"{source}/kl", masked_mean(terms["kl"].detach(), kl_mask * row_mask))
            if (mask * row_mask).sum() > 0:
                self.record(f"{source}/ratio", masked_mean(terms["ratio"], mask * row_mask))

    # ------------------------------------------------------------------ checkpoints
    def trainer_extra_state(self) -> dict[str, Any]:
        return {"rlpr_threshold": self.rlpr_threshold, "rlpr_filter": self.rlpr_filter.state_dict()}

    def load_trainer_extra_state(self, state: dict[str, Any]) -> None:
        self.rlpr_threshold = float(state.get("rlpr_threshold", 0.0))
        if "rlpr_filter" in state:
            self.rlpr_filter.load_state_dict(state["rlpr_filter"])
