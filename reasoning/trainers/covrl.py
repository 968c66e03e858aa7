"""CoVRL — Coupled Variational RL (Wen et al., arXiv 2512.12576) and the verifier-free reward family.

One set of weights plays three roles by prompt template (`data/templates.py`): the prior
p_φ(z|x) (question only), the posterior q_ψ(z|x, y*) (the reference answer y* as a hint in the
prompt) and the decoder p_θ(y*|x, z) (y* appended after the trace, scored under the prior
prompt). The trainer maximises the ELBO E_{p′}[log p_θ(y*|x, z)] − KL(p′ ‖ p_φ) with the
composite policy p′(z_t|·) = w p_φ(z_t|·) + (1 − w) q_ψ(z_t|·) (w = ½ in the paper):

- hybrid sampling: each rollout (or each prompt group, `sampling_level: group`) is generated from
  the prior prompt with probability α, else from the posterior prompt;
- both template passes (prior and posterior prompt over the same completion tokens, and the decoder
  rows when its term is on) run as one forward; log p′_t = logsumexp(log w + ℓp_t, log(1 − w) + ℓq_t);
- reward R = log p_θold(y*|x, z): the trace is cut at its first answer marker
  (`templates.TraceCutter`, `at="first"`), the marker and y* are appended and scored by the old
  policy under the prior prompt (`models.scoring.answer_logprobs`, EOS not scored); completions
  without a marker and truncated ones are excluded (Â = 0) by default;
- advantage Â = R − mean of the group (optionally std-normalised; `objectives.policy.group_baseline_advantages`);
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

from typing import Any

import torch

from reasoning.data.templates import TraceCut, TraceCutter, answer_layout, posterior_columns
from reasoning.models.scoring import (
    CompletionForward,
    Warpers,
    answer_logprobs,
    no_grad_chunks,
    pack_completions,
    stack_completions,
)
from reasoning.objectives.covrl import (
    composite_policy_terms,
    decoder_weights,
    nll_selection,
    sample_sources,
    selective_nll,
)
from reasoning.objectives.logprobs import masked_mean, masked_sum
from reasoning.objectives.policy import aggregate_loss, group_baseline_advantages
from reasoning.rewards.likelihood import (
    RLPRStdFilter,
    jensen_bound,
    likelihood_reward,
    mean_token_probability,
    verifree_answer_nll,
)
from reasoning.rollout import Rollout
from reasoning.trainers.base import LossOutput, RolloutTrainer
from reasoning.trainers.covrl_config import AGGREGATION, REWARDS, RLPR_STD_EPS, CoVRLConfig

__all__ = ["REWARDS", "CoVRLConfig", "CoVRLTrainer"]

# the decoder rows' columns in a batch (`pack_completions` names -> batch names)
DECODER_KEYS = {
    "prompt_ids": "answer_prompt_ids",
    "prompt_mask": "answer_prompt_mask",
    "completion_ids": "answer_ids",
    "completion_mask": "answer_mask",
}


class CoVRLTrainer(RolloutTrainer):
    """CoVRL and the verifier-free baselines on engine rollouts (see the module docstring).

    `ref_model`: LaTRO's frozen π₀ (default: the starting policy, `RolloutTrainer.frozen_model`).
    """

    config: CoVRLConfig
    # likelihood rewards need no reward function; `verifier` checks for one in __init__
    needs_rewards = False

    def __init__(self, *args: Any, ref_model: torch.nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.config
        if cfg.reward == "verifier" and not self.reward_funcs:
            raise ValueError("covrl.reward = verifier needs at least one reward function (reward.functions)")
        self.ref_model = self.frozen_model(ref_model) if cfg.reward == "latro" else None
        self.rlpr_filter = RLPRStdFilter(
            beta=cfg.rlpr_std_filter_beta,
            momentum=cfg.rlpr_filter_momentum,
            ema_start=cfg.rlpr_filter_ema_start,
            filter_start=cfg.rlpr_filter_start,
        )
        self.rlpr_threshold = 0.0  # the last generation's std bound (0: not filtering yet)
        stops = self.sampling.stop_token_ids
        self.cutter = TraceCutter(self.template, self.processing_class, at="first", stop_ids=stops)

    def prompt_columns(self, row: dict[str, Any]) -> dict[str, Any]:
        """The prior prompt (the base's) and the posterior prompt with the hint, as text and ids."""
        cfg = self.config
        for column in (cfg.hint_column, cfg.answer_column):
            if column not in row:
                raise ValueError(
                    f"covrl needs the column {column!r} in the training data; it has {sorted(row)}"
                )
        posterior = posterior_columns(
            self.template, self.processing_class, row, cfg.hint_column, cfg.hint_after
        )
        return {**super().prompt_columns(row), **posterior}

    # ------------------------------------------------------------------ hybrid sampling
    def hybrid_sources(self, num_groups: int) -> torch.Tensor:
        """Which rollouts the prior samples, `bool [num_groups, G]`, seeded by the step (a resume repeats it).

        Drawn for the global generation batch and sliced to this rank's groups, so a prompt's sources
        do not depend on the number of ranks.
        """
        generator = torch.Generator().manual_seed(self.args.seed + 7919 * self.state.global_step)
        size, world, cfg = self.config.num_generations, self.args.world_size, self.config
        flags = sample_sources(num_groups * world, size, cfg.alpha, cfg.sampling_level, generator)
        first = self.args.process_index * num_groups
        return flags.view(num_groups * world, size)[first : first + num_groups]

    def generate(self, rows: list[dict[str, Any]]) -> list[list[Rollout]]:
        """G rollouts per prompt, each from the prior or the posterior prompt as `hybrid_sources` says.

        Always one engine call (each call costs a full decoding loop). When every group has a single
        source the call takes one prompt per group with n = G and the group's seed (`prompt_seeds`),
        as the base does; otherwise one prompt per rollout with n = 1, rollout j of a group seeded with
        the group's seed + j (what vLLM gives the j-th of n samples: a request seeded alike would repeat
        its sample). Each rollout carries `extra["from_prior"]`, in the drawn positions.
        """
        self.sync_engine()
        sources = self.hybrid_sources(len(rows))
        keys = {True: "prompt_ids", False: "posterior_prompt_ids"}
        sampling, seeds, size = (
            self.generation_sampling(),
            self.prompt_seeds(len(rows)),
            self.config.num_generations,
        )
        with self.timed("generation"):
            if bool((sources == sources[:, :1]).all()):
                prompts = [row[keys[bool(flags[0])]] for row, flags in zip(rows, sources)]
                groups = self.engine.generate(prompts, sampling, n=size, seeds=seeds)
            else:
                prompts = [row[keys[flag]] for row, flags in zip(rows, sources.tolist()) for flag in flags]
                seeds = None if seeds is None else [seed + j for seed in seeds for j in range(size)]
                flat = [group[0] for group in self.engine.generate(prompts, sampling, n=1, seeds=seeds)]
                groups = [flat[i * size : (i + 1) * size] for i in range(len(rows))]
        for i, (group, flags) in enumerate(zip(groups, sources.tolist())):
            for rollout, from_prior in zip(group, flags):
                rollout.extra["from_prior"] = from_prior
                rollout.prompt_index = i
        return [list(group) for group in groups]

    # ------------------------------------------------------------------ batch
    def cut(self, rollout: Rollout) -> TraceCut:
        """The completion cut before its first answer marker (stop token dropped); without a marker the
        whole completion is the trace and `missing_answer` says what it gets."""
        return self.cutter(rollout.completion_ids, rollout.truncated)

    def needs_old_logprobs(self) -> bool:
        return False  # the old prior and posterior passes are stored by build_batch (two tensors)

    def needs_posterior_pass(self) -> bool:
        """The posterior template is scored unless p′ is the prior alone and nothing was posterior-sampled."""
        return self.config.composite_weight < 1.0 or self.config.alpha < 1.0

    def build_batch(
        self, rows: list[dict[str, Any]], groups: list[list[Rollout]], rewards: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        cfg, tokenizer = self.config, self.processing_class
        batch = self.collate_rollouts(groups)
        rollouts = [r for group in groups for r in group]
        row_of = [i for i, group in enumerate(groups) for _ in group]
        n, width = batch["completion_ids"].shape
        prior_prompts = [list(rows[i]["prompt_ids"]) for i in row_of]
        # prior and posterior prompts left-padded to one width, so one forward takes both
        prompts = pack_completions(
            prior_prompts + [rows[i]["posterior_prompt_ids"] for i in row_of], [[]] * (2 * n), self.pad_id
        )
        for name, part in (("prompt", slice(0, n)), ("posterior_prompt", slice(n, 2 * n))):
            batch[f"{name}_ids"], batch[f"{name}_mask"] = (
                prompts["prompt_ids"][part],
                prompts["prompt_mask"][part],
            )
        cuts = [self.cut(r) for r in rollouts]
        answers = [self.template.split_completion(r.text)[1] for r in rollouts]
        batch["from_prior"] = torch.tensor([bool(r.extra["from_prior"]) for r in rollouts])
        batch["well_formed"] = torch.tensor(
            [not r.truncated and bool(a and a.strip()) for r, a in zip(rollouts, answers)]
        )
        batch["missing_answer"] = torch.tensor([c.missing for c in cuts])
        # RLPR's and NOVER's format check: one answer marker, a non-empty answer, not truncated
        batch["format_ok"] = batch["well_formed"] & torch.tensor([c.marker_count == 1 for c in cuts])
        trace_lengths = torch.tensor([len(c.trace) for c in cuts])
        policy_lengths = torch.tensor([c.policy_length for c in cuts]).unsqueeze(1)
        batch["trace_mask"] = (torch.arange(width).unsqueeze(0) < policy_lengths).long() * batch[
            "completion_mask"
        ]
        batch["policy_mask"] = (
            batch["trace_mask"] if cfg.policy_tokens == "trace" else batch["completion_mask"]
        )
        # the old policy's passes when the batch outlives this step (or LaTRO needs log q(z|x))
        reuses = super().needs_old_logprobs()
        old = None
        if reuses or cfg.reward == "latro":
            posterior = self.needs_posterior_pass()
            rows_per_pass = self.args.per_device_train_batch_size
            old = no_grad_chunks(
                lambda part: self.template_passes(self.model, part, posterior), batch, rows_per_pass
            )
            if reuses:
                batch.update({f"old_{k}_logprobs": v for k, v in old.items()})
        # the reference answer after each trace, scored by the old policy under the prior prompt
        layouts = [
            answer_layout(
                self.template,
                tokenizer,
                prompt,
                c.trace,
                str(rows[i][cfg.answer_column]),
                score_eos=cfg.score_eos,
                marker=c.marker,
            )
            for prompt, c, i in zip(prior_prompts, cuts, row_of)
        ]
        with self.timed("answer_scoring"):
            scored = self.answer_logprobs(layouts)
            total = self.training_reward(
                rows, rewards, scored.answer, scored.answer_mask, trace_lengths, old, batch
            )
        # on every rank's rewards: `batch` scaling and the RLPR threshold use the global batch
        everyone, mine = self.gather_generation(total)
        std_eps = dict(eps=RLPR_STD_EPS, min_std=RLPR_STD_EPS) if cfg.reward == "rlpr" else {}
        advantages = group_baseline_advantages(
            everyone, cfg.num_generations, baseline=cfg.baseline, scale=cfg.scale_advantages, **std_eps
        )[mine]
        if cfg.reward == "rlpr" and cfg.rlpr_std_filter:
            bound, keep = self.rlpr_filter.filter(total, everyone, cfg.num_generations)
            self.rlpr_threshold = 0.0 if bound is None else bound
            if keep is not None:
                self.record("rlpr/kept_fraction", keep.float().mean())
                self.record("rlpr/threshold", bound)
                advantages = advantages * keep
        batch["advantages"] = advantages
        if cfg.answer_nll_coef > 0:  # the decoder rows: prompt + trace + marker, then y*
            prefixes, answers = (
                [s.ids[: s.answer_start] for s in layouts],
                [s.ids[s.answer_start :] for s in layouts],
            )
            decoder = pack_completions(prefixes, answers, self.pad_id)
            batch.update({DECODER_KEYS[key]: value for key, value in decoder.items()})
            batch["answer_weights"] = decoder_weights(
                cfg.reward, total, scored.answer, scored.answer_mask, batch["truncated"], cfg.num_generations
            )
        batch["training_rewards"] = total
        # The base logs `rewards` (mean, group std): truncated samples show their group's mean there.
        grouped = total.view(-1, cfg.num_generations)
        fill = torch.nan_to_num(torch.nanmean(grouped, dim=1, keepdim=True), nan=0.0).expand_as(grouped)
        batch["rewards"] = torch.where(~torch.isnan(grouped), grouped, fill).reshape(-1)
        self._record_generation(
            batch, rewards, masked_sum(scored.answer, scored.answer_mask, dim=-1), trace_lengths
        )
        return batch

    def answer_logprobs(self, layouts: list) -> Any:
        """log p_θold(y*_t | x, z, y*_<t) of the layouts' answers (temperature 1: the model's own likelihood)."""
        model = self.accelerator.unwrap_model(self.model)
        return answer_logprobs(model, layouts, pad_id=self.pad_id, batch_size=self.config.scoring_batch_size)

    def training_reward(
        self,
        rows: list[dict[str, Any]],
        table: torch.Tensor,
        answer_logp: torch.Tensor,
        answer_mask: torch.Tensor,
        trace_lengths: torch.Tensor,
        old: dict[str, torch.Tensor] | None,
        batch: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """The reward `[N]` that trains (NaN = not applicable: excluded by `truncated_reward` or
        `missing_answer`): `rewards.likelihood.likelihood_reward`, or the reward functions (`verifier`)."""
        cfg, extra = self.config, {}
        if cfg.reward == "verifier":
            return self.combine_rewards(table)
        if cfg.reward == "rlpr":
            self.record("rlpr/format", batch["format_ok"].float().mean())
            if cfg.rlpr_debias:  # y* right after the question: the part of the reward no trace explains
                bare = [
                    answer_layout(self.template, self.processing_class, row["prompt_ids"], [], str(row[cfg.answer_column]), score_eos=cfg.score_eos)
                    for row in rows
                ]  # fmt: skip
                scored = self.answer_logprobs(bare)
                no_trace = mean_token_probability(scored.answer, scored.answer_mask)
                extra["no_trace_probability"] = no_trace.repeat_interleave(cfg.num_generations)
                self.record("rlpr/no_trace_probability", extra["no_trace_probability"].mean())
        if cfg.reward == "latro":  # log q(z|x) under the old policy and log π₀(z|x) under the reference
            trace_mask = batch["trace_mask"].float()
            extra["trace_logp"] = masked_sum(old["prior"], trace_mask, dim=-1)
            extra["reference_trace_logp"] = masked_sum(self.ref_model.logprobs(batch), trace_mask, dim=-1)
            self.record("latro/trace_log_ratio", (extra["trace_logp"] - extra["reference_trace_logp"]).mean())
        reward = likelihood_reward(
            cfg.reward, answer_logp, answer_mask, cfg.num_generations,
            truncated=batch["truncated"], truncated_reward=cfg.truncated_reward,
            missing=batch["missing_answer"], missing_answer=cfg.missing_answer, reduction=cfg.answer_reduction,
            trace_lengths=trace_lengths, format_ok=batch["format_ok"], log_base=cfg.nover_log_base,
            format_coef=cfg.rlpr_format_coef, latro_beta=cfg.latro_beta, **extra,
        )  # fmt: skip
        if cfg.reward == "jepo":
            bound = jensen_bound(reward.view(-1, cfg.num_generations))
            self.record_mean("jepo/bound", bound)
        return reward

    def _record_generation(
        self,
        batch: dict[str, torch.Tensor],
        table: torch.Tensor,
        log_likelihood: torch.Tensor,
        lengths: torch.Tensor,
    ) -> None:
        """Generation metrics, overall and split by the source that sampled each trajectory."""
        total, truncated, kept, prior = (
            batch["training_rewards"],
            batch["truncated"],
            ~batch["truncated"],
            batch["from_prior"],
        )
        self.record("hybrid/prior_fraction", prior.float().mean())
        self.record("trace_length", lengths[kept].float().mean() if kept.any() else 0.0)
        self.record_mean("answer_logprob", log_likelihood, kept)
        self.record("well_formed", batch["well_formed"].float().mean())
        self.record("missing_answer", batch["missing_answer"].float().mean())
        names = [getattr(f, "__name__", f"reward_{j}") for j, f in enumerate(self.reward_funcs)]
        for source, rows in (("prior", prior), ("posterior", ~prior)):
            if rows.any():
                self.record_mean(f"{source}/reward", total, rows)
                self.record_mean(f"{source}/answer_logprob", log_likelihood, rows & kept)
                self.record(f"{source}/length", batch["completion_mask"][rows].sum(dim=1).float().mean())
                self.record(f"{source}/truncated", truncated[rows].float().mean())
                self.record(f"{source}/well_formed", batch["well_formed"][rows].float().mean())
                for j, name in enumerate(names):
                    self.record_mean(f"{source}/rewards/{name}", table[:, j], rows)

    # ------------------------------------------------------------------ passes and loss
    def template_passes(
        self,
        model: torch.nn.Module,
        batch: dict[str, torch.Tensor],
        posterior: bool = True,
        answer: bool = False,
    ) -> dict[str, torch.Tensor]:
        """One forward over [prior rows; posterior rows; decoder rows] (`models.scoring.CompletionForward`).

        `prior` `[B, T]`: log p_φ of the completion tokens under the prior prompt; `posterior` `[B, T]`:
        the same tokens under the posterior prompt (with `posterior`), both at the sampling warpers;
        with `answer`, the reference answer's token log-probs after prompt + trace + marker `answer`
        `[B, A]` (temperature 1) and their mask `answer_mask`.
        """
        n, width = batch["completion_ids"].shape
        keys = [("prompt_ids", "prompt_mask")] + [
            ("posterior_prompt_ids", "posterior_prompt_mask")
        ] * posterior
        parts = [
            {"prompt_ids": batch[ids], "prompt_mask": batch[mask], "completion_ids": batch["completion_ids"], "completion_mask": batch["completion_mask"]}
            for ids, mask in keys
        ]  # fmt: skip
        if answer:
            parts.append({key: batch[name] for key, name in DECODER_KEYS.items()})
        forward = CompletionForward(
            model, stack_completions(parts, self.pad_id), self.config.logprob_chunk_size
        )
        result = {"prior": forward.logprobs(self.warpers, rows=slice(0, n), width=width)[0]}
        if posterior:
            result["posterior"] = forward.logprobs(self.warpers, rows=slice(n, 2 * n), width=width)[0]
        if answer:
            rows, answer_width = slice(len(keys) * n, (len(keys) + 1) * n), batch["answer_ids"].shape[1]
            result["answer"] = forward.logprobs(Warpers(), rows=rows, width=answer_width)[0]
            result["answer_mask"] = batch["answer_mask"].to(result["answer"].device)
        return result

    def loss_terms(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Per-token surrogate and KL `[B, T]` (`objectives.covrl.composite_policy_terms`) with their masks,
        the scalar NLL and decoder terms, and the log-probs they were computed from."""
        cfg = self.config
        passes = self.template_passes(
            model, batch, posterior=self.needs_posterior_pass(), answer=cfg.answer_nll_coef > 0
        )
        prior = passes["prior"]
        posterior, device = passes.get("posterior", prior), prior.device
        old = {key: batch.get(f"old_{key}_logprobs") for key in ("prior", "posterior")}
        old = {
            key: (value.to(device) if value is not None else passes.get(key, prior).detach())
            for key, value in old.items()
        }
        from_prior, advantages = batch["from_prior"].to(device), batch["advantages"].to(device)
        policy_mask = batch["policy_mask"].to(device).float()
        kl_mask = policy_mask * (~batch["truncated"].to(device)).unsqueeze(1).float()
        terms = composite_policy_terms(
            prior, posterior, old["prior"], old["posterior"], from_prior, advantages, policy_mask, kl_mask,
            weight=cfg.composite_weight, ratio_to=cfg.ratio_to, eps_low=cfg.epsilon, eps_high=cfg.epsilon_high,
            kl_weighting=cfg.kl_weighting, with_kl=cfg.kl_coef > 0,
        )  # fmt: skip
        selected = nll_selection(from_prior, batch["well_formed"].to(device), advantages)
        mask = batch["completion_mask"].to(device).float()
        nll = selective_nll(prior, mask, selected, coef=1.0) if cfg.nll_coef > 0 else prior.new_zeros(())
        decoder = prior.new_zeros(())
        if cfg.answer_nll_coef > 0:
            decoder = verifree_answer_nll(
                passes["answer"], passes["answer_mask"], batch["answer_weights"].to(device)
            )
        return {
            **terms._asdict(), "policy_mask": policy_mask, "kl_mask": kl_mask, "nll": nll, "nll_selected": selected,
            "answer_nll": decoder, "prior": prior, "posterior": posterior,
        }  # fmt: skip

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        cfg = self.config
        terms = self.loss_terms(model, batch)
        per_token = terms["surrogate"] + cfg.kl_coef * terms["kl"]
        policy = aggregate_loss(
            per_token,
            terms["policy_mask"],
            AGGREGATION[cfg.loss_type],
            max_completion_length=self.sampling.max_tokens,
        )
        total = policy + cfg.nll_coef * terms["nll"] + cfg.answer_nll_coef * terms["answer_nll"]
        return LossOutput(total, self._loss_metrics(batch, terms))

    @torch.no_grad()
    def _loss_metrics(self, batch: dict[str, torch.Tensor], terms: dict[str, Any]) -> dict[str, Any]:
        mask, kl_mask, kl = terms["policy_mask"], terms["kl_mask"], terms["kl"].detach()
        metrics = {
            "loss/surrogate": masked_mean(terms["surrogate"].detach(), mask),
            "kl": masked_mean(kl, kl_mask),
            "loss/nll": terms["nll"].detach(),
            "loss/answer_nll": terms["answer_nll"].detach(),
            "nll/selected_fraction": terms["nll_selected"].float().mean(),
            **{f"clip_ratio/{name}": value for name, value in terms["clip_stats"].items()},
        }
        if "engine_logprobs" in batch:
            metrics["sampling/logp_difference_mean"] = self.engine_mismatch(terms["behaviour"], batch)
        from_prior = batch["from_prior"].to(mask.device)
        for source, rows in (("prior", from_prior), ("posterior", ~from_prior)):
            row_mask = rows.unsqueeze(1).float()
            if (kl_mask * row_mask).sum() > 0:
                metrics[f"{source}/kl"] = masked_mean(kl, kl_mask * row_mask)
            if (mask * row_mask).sum() > 0:
                metrics[f"{source}/ratio"] = masked_mean(terms["ratio"], mask * row_mask)
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def trainer_extra_state(self) -> dict[str, Any]:
        return {"rlpr_threshold": self.rlpr_threshold, "rlpr_filter": self.rlpr_filter.state_dict()}

    def load_trainer_extra_state(self, state: dict[str, Any]) -> None:
        self.rlpr_threshold = float(state.get("rlpr_threshold", 0.0))
        if "rlpr_filter" in state:
            self.rlpr_filter.load_state_dict(state["rlpr_filter"])
