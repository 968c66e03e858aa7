"""Online variational reasoning: Algorithm 1 of Zhou et al. (2025) with fresh rollouts every step.

The offline pipeline (`trainers/variational.py`) runs one round of Algorithm 1 as stages. This
trainer alternates the two steps inside one training loop, each on fresh rollouts:

- φ-step (`phi_steps` per cycle, its own AdamW: the side parameters "phi"), forward KL (Eq. 9):
  M traces z_1..M ~ π_θ(z|x) (prior prompt), weights w̃_m = π̂(Y|x, z_m) / Σ_j π̂(Y|x, z_j) (the
  configured estimator, usually Acc), loss −(1/Q) Σ_q Σ_m w̃_qm log q_φ(z_qm, y|x, y′) over the Q
  questions of the step, under the posterior template (q is trained on the whole completion it
  will be asked to write — trace, answer marker and answer — as the pipeline's forward-KL stage
  does). `posterior_objective: reverse_kl` instead samples K traces from q_φ and takes the
  score-function step −(1/Q) Σ_q Σ_k (r_qk − r̄_q) log q_φ(z_qk|x, y′), r = log π_θ(z, Y|x) −
  log q_φ(z|x, y′) (the reverse KL, for comparison: the paper found it to collapse into
  answer-leaking traces).
- θ-step (one optimizer step of the transformers Trainer): K traces z_1..K ~ q_φ(z|x, y′), the
  practical weights of Eq. 8, log ρ_k = (log π_θ(z_k|x) − log q_φ(z_k|x, y′)) / |z_k| +
  log π̂_θ(Y|x, z_k), ρ̃ = softmax over the question's K traces, and the loss
  −(1/Q) Σ_q Σ_k ρ̃_qk log π_θ(z_qk, y_qk|x) (weighted SFT of trace + answer under the prior
  template). Traces are cut before their last answer marker (`templates.TraceCutter`, `at="last"`,
  as the pipeline); a trace without the marker or cut by the token budget has ρ = 0; a question
  none of whose traces has weight falls back to its reference solution (weight 1), as in the
  pipeline (`fallback_to_reference`).

With `theta_steps` = T_θ, the φ-steps run before every T_θ-th θ-step (φ first: Algorithm 1's
order). θ is the Trainer's model; φ is a second model (from `posterior_path`, else a copy of θ),
or, with `shared_posterior`, θ itself under the hint template (as in CoVRL), stepped by the φ
AdamW. Every log-probability is teacher-forced at temperature 1 (the models' own likelihoods), so
the logged IWAE bound log (1/K) Σ_k π_θ(z_k, Y|x)/q_φ(z_k|x, y′) (with the true L weight) is an
exact draw of the bound when `rollout.temperature` is 1. π̂ for Acc is the fraction of
`answer_samples` answers sampled from π_θ after the trace that the reward functions grade correct
(combined reward ≥ `correct_threshold`); with Acc the SFT target after a trace is a correct sampled
answer (the reference answer when none was), as in the pipeline. With `hf` each model has its own
`HFEngine` around the live model; with vLLM one engine serves both, re-synced when the other
model's weights are needed (docs/variational.md). The mathematics is in `objectives/variational.py`.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from reasoning.data.templates import ScoringIds, TraceCutter, answer_layout, encode, posterior_columns
from reasoning.models.scoring import (
    AnswerLogprobs,
    Warpers,
    answer_logprobs,
    completion_logprobs,
    pack_completions,
)
from reasoning.objectives.logprobs import masked_sum
from reasoning.objectives.variational import (
    forward_kl_posterior_weights,
    iwae_bound,
    log_acc_estimator,
    log_gml_estimator,
    log_likelihood_estimator,
    normalized_weights,
    practical_log_weights,
    weighted_posterior_nll,
)
from reasoning.rollout import Rollout, RolloutEngine, Sampling
from reasoning.rollout.hf import HFEngine
from reasoning.trainers.base import LossOutput, RolloutTrainer
from reasoning.trainers.variational_online_config import POSTERIOR_OBJECTIVES, OnlineVariationalConfig

__all__ = ["POSTERIOR_OBJECTIVES", "OnlineVariationalConfig", "OnlineVariationalTrainer", "Traces"]


@dataclass
class Traces:
    """Traces of one sampling phase, flat and question-major (`question[i]` = row index of trace i)."""

    question: list[int]
    ids: list[list[int]]  # trace tokens, without the answer marker
    text: list[str]
    valid: torch.Tensor  # bool [N]: marker found, not truncated, not empty
    correct: torch.Tensor  # bool [N]: the sampled completion's own answer graded correct
    rewards: torch.Tensor  # [N, F]: the reward functions' values (NaN = not applicable)
    groups: list[list[Rollout]] | None = None  # the rollouts they were cut from (for the completions log)
    markers: list[str | None] | None = (
        None  # each completion's marker text (`TraceCut.marker`; None: answer_prefix)
    )


class OnlineVariationalTrainer(RolloutTrainer):
    """Alternating φ- and θ-steps on fresh rollouts (see the module docstring).

    Extra arguments: `posterior_model` (q_φ; default from `config.posterior_path` or a copy of θ)
    and `posterior_engine` (the engine that samples q_φ; default: an `HFEngine` on q_φ when the main
    engine is an `HFEngine`, else the main engine, re-synced).
    """

    config: OnlineVariationalConfig
    # the micro-batch values −(1/Q) Σ_i ρ̃_i log π_θ(z_i, y_i|x) of one step add up to the θ loss
    loss_reduction = "sum"

    def __init__(
        self,
        *args: Any,
        posterior_model: torch.nn.Module | None = None,
        posterior_engine: RolloutEngine | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.config
        if self.steps_per_generation != self.args.gradient_accumulation_steps:
            raise ValueError(
                f"the online trainer samples fresh rollouts for every optimizer step: steps_per_generation "
                f"({self.steps_per_generation}) must equal gradient_accumulation_steps "
                f"({self.args.gradient_accumulation_steps})"
            )
        if cfg.fallback_to_reference and "solution" not in self.train_dataset.column_names:
            raise ValueError("fallback_to_reference needs a 'solution' column; add one or set it to false")
        theta = self.accelerator.unwrap_model(self.model)
        if cfg.shared_posterior:
            if posterior_model is not None:
                raise ValueError("shared_posterior: q_φ is θ's network, do not pass a posterior_model")
            if self.is_deepspeed_enabled:
                raise ValueError("shared_posterior steps θ's parameters outside DeepSpeed: not supported")
            self.phi = theta
        elif posterior_model is not None:
            self.phi = posterior_model
        elif cfg.posterior_path:
            self.phi = AutoModelForCausalLM.from_pretrained(cfg.posterior_path, dtype=theta.dtype)
        else:
            self.phi = self.policy_copy(frozen=False)  # under ZeRO-3: gathered into a full model
        self.phi.train()
        # φ's AdamW, stepped by `_phi_update`; a shared φ is θ, whose weights the Trainer saves
        self.phi_side = self.add_side_parameters(
            "phi", self.phi, cfg.phi_learning_rate, weight_decay=cfg.phi_weight_decay, step="manual",
            max_grad_norm=cfg.phi_max_grad_norm, save_module=not cfg.shared_posterior,
        )  # fmt: skip
        if posterior_engine is not None:
            self.posterior_engine = posterior_engine
        elif not cfg.shared_posterior and isinstance(self.engine, HFEngine):
            # an HFEngine wraps its live model: re-syncing it with φ would overwrite θ
            self.posterior_engine = HFEngine(
                model=self.phi, tokenizer=self.processing_class, batch_size=self.engine.batch_size
            )
        else:
            self.posterior_engine = self.engine
        self._engine_holds: dict[int, tuple] = {}
        stops = self.sampling.stop_token_ids
        self.cutter = TraceCutter(self.template, self.processing_class, at="last", stop_ids=stops)
        # prompt + trace + marker + answer + EOS (scored as the pipeline's GML / L weights do)
        self.layout = functools.partial(answer_layout, self.template, self.processing_class, score_eos=True)

    @property
    def phi_updates(self) -> int:
        """φ-steps taken (checkpointed with φ's side parameters)."""
        return self.phi_side.steps

    # ------------------------------------------------------------------ data
    def prompt_columns(self, row: dict[str, Any]) -> dict[str, Any]:
        """Prior prompts (the base's) plus the posterior prompt with the hint, as text and ids."""
        cfg = self.config
        if cfg.answer_column not in row:
            raise ValueError(
                f"variational_online needs the column {cfg.answer_column!r}; the data has {sorted(row)}"
            )
        hinted = posterior_columns(self.template, self.processing_class, row, cfg.hint_column, cfg.hint_after)
        return {**super().prompt_columns(row), **hinted}

    # ------------------------------------------------------------------ engines and sampling
    def _weights_version(self, role: str) -> tuple:
        """A key that changes whenever the weights of `role` (theta or phi) change."""
        if role == "theta" or self.config.shared_posterior:
            return ("theta", self.state.global_step, self.phi_updates if self.config.shared_posterior else 0)
        return ("phi", self.phi_updates)

    def engine_for(self, role: str) -> RolloutEngine:
        """The engine of `role`, holding that model's current weights (synced only when stale)."""
        engine = self.engine if role == "theta" else self.posterior_engine
        model = self.accelerator.unwrap_model(self.model) if role == "theta" else self.phi
        key = self._weights_version(role)
        if self._engine_holds.get(id(engine)) != key:
            with self.timed("sync"):
                engine.sync_weights(model)
            self._engine_holds[id(engine)] = key
            self.sync_count += 1
        return engine

    def sync_engine(self) -> None:
        self.engine_for("theta")

    def _seeds(self, tag: str, count: int) -> list[int] | None:
        """A seed per prompt from (seed, step, tag, global position): rank-independent, repeated on resume."""
        if self.sampling.seed is None:
            return None
        first, key = self.args.process_index * count, f"{self.sampling.seed}-{self.state.global_step}-{tag}"
        return [random.Random(f"{key}-{first + i}").getrandbits(31) for i in range(count)]

    def _sample(
        self, role: str, prompts: list[list[int]], sampling: Sampling, n: int, seeds: list[int] | None
    ) -> list[list[Rollout]]:
        engine = self.engine_for(role)
        with self.timed("generation"):
            return engine.generate(prompts, sampling, n=n, seeds=seeds)

    def _traces(self, rows: list[dict[str, Any]], groups: list[list[Rollout]]) -> Traces:
        """Each rollout cut before its last answer marker (`TraceCutter`), and its own answer graded."""
        rollouts = [r for group in groups for r in group]
        question = [i for i, group in enumerate(groups) for _ in group]
        cuts = [self.cutter(r.completion_ids, r.truncated) for r in rollouts]
        texts = [self.processing_class.decode(c.trace, skip_special_tokens=True) for c in cuts]
        valid = [c.marker_found and not r.truncated and len(c.trace) > 0 for c, r in zip(cuts, rollouts)]
        with self.timed("reward"):
            flat_rows, completions = [rows[q] for q in question], [r.text for r in rollouts]
            table = self.reward_table(flat_rows, completions, [r.completion_ids for r in rollouts])
        correct = self.combine_rewards(table) >= self.config.correct_threshold
        ids, markers = [c.trace for c in cuts], [c.marker for c in cuts]
        return Traces(
            question, ids, texts, torch.tensor(valid, dtype=torch.bool), correct, table, groups, markers
        )

    # ------------------------------------------------------------------ scoring
    def _scoring(
        self, rows: list[dict[str, Any]], traces: Traces, answers: list[str], prompt: str
    ) -> list[ScoringIds]:
        """prompt (`prompt_ids` or `posterior_prompt_ids`) + trace + its marker + answer + EOS, per trace."""
        markers = traces.markers or [None] * len(traces.ids)
        return [
            self.layout(list(rows[q][prompt]), trace, answer, marker=marker)
            for q, trace, answer, marker in zip(traces.question, traces.ids, answers, markers)
        ]

    def _reference_answers(self, rows: list[dict[str, Any]], traces: Traces) -> list[str]:
        return [str(rows[q][self.config.answer_column]) for q in traces.question]

    @torch.no_grad()
    def _answer_scores(self, model: torch.nn.Module, layouts: list[ScoringIds]) -> AnswerLogprobs:
        """`models.scoring.answer_logprobs` with the trace (temperature 1), `model` in eval mode meanwhile."""
        was_training, size = model.training, self.config.scoring_batch_size
        model.eval()
        try:
            return answer_logprobs(model, layouts, self.pad_id, size, with_trace=True)
        finally:
            model.train(was_training)

    def _prior_scores(self, rows: list[dict[str, Any]], traces: Traces) -> AnswerLogprobs:
        """Under π_θ (prior prompt, reference answer): log π(z|x) `trace` `[N]` and |z| `trace_length` `[N]`
        (trace + marker), the answer's token log-probs `answer` `[N, A]` and `answer_mask`."""
        layouts = self._scoring(rows, traces, self._reference_answers(rows, traces), "prompt_ids")
        return self._answer_scores(self.accelerator.unwrap_model(self.model), layouts)

    def _posterior_trace_logp(self, rows: list[dict[str, Any]], traces: Traces) -> torch.Tensor:
        """log q_φ(z|x, y′) `[N]` (float64) of each trace + marker under the posterior prompt."""
        layouts = self._scoring(rows, traces, self._reference_answers(rows, traces), "posterior_prompt_ids")
        return self._answer_scores(self.phi, layouts).trace

    def _accuracy(
        self, rows: list[dict[str, Any]], traces: Traces, tag: str
    ) -> tuple[torch.Tensor, list[str | None]]:
        """Acc: correct counts `[N]` among `answer_samples` answers sampled from π_θ after each trace
        (and its marker), and one correct answer per trace (None when there is none)."""
        cfg, tokenizer = self.config, self.processing_class
        # only valid traces are asked for answers: the others get weight 0 whatever they answer
        chosen = traces.valid.nonzero().flatten().tolist()
        given = traces.markers or [None] * len(traces.ids)
        markers = {i: given[i] or self.template.answer_prefix for i in chosen}
        marker_ids = {i: encode(tokenizer, text) for i, text in markers.items()}
        prompts = [
            list(rows[traces.question[i]]["prompt_ids"]) + traces.ids[i] + marker_ids[i] for i in chosen
        ]
        correct = torch.zeros(len(traces.ids), dtype=torch.long)
        answers: list[str | None] = [None] * len(traces.ids)
        if not chosen:
            return correct, answers
        sampling = Sampling(
            temperature=cfg.answer_temperature, max_tokens=cfg.answer_max_tokens,
            stop_token_ids=self.sampling.stop_token_ids, seed=self.sampling.seed,
        )  # fmt: skip
        seeds = self._seeds(tag, len(traces.ids))
        seeds = None if seeds is None else [seeds[i] for i in chosen]
        groups = self._sample("theta", prompts, sampling, cfg.answer_samples, seeds)
        texts, ids, question = [], [], []
        for i, group in zip(chosen, groups):
            for rollout in group:
                texts.append(traces.text[i] + markers[i] + rollout.text)
                ids.append(list(traces.ids[i]) + marker_ids[i] + list(rollout.completion_ids))
                question.append(traces.question[i])
        with self.timed("reward"):
            table = self.reward_table([rows[q] for q in question], texts, ids)
        graded = (self.combine_rewards(table) >= cfg.correct_threshold).view(len(groups), cfg.answer_samples)
        correct[chosen] = graded.sum(dim=1)
        for j, (i, flags) in enumerate(zip(chosen, graded.tolist())):
            if any(flags):
                text = texts[j * cfg.answer_samples + flags.index(True)]
                answers[i] = self.template.split_completion(text)[1]
        return correct, answers

    def _log_estimator(
        self, rows: list[dict[str, Any]], traces: Traces, prior: AnswerLogprobs | None, name: str, tag: str
    ) -> tuple[torch.Tensor, list[str]]:
        """log π̂_θ(Y|x, z) `[N]` (float64, −inf for invalid traces) and each trace's SFT target answer."""
        cfg = self.config
        targets = self._reference_answers(rows, traces)
        if cfg.estimator == "acc":
            correct, answers = self._accuracy(rows, traces, tag)
            log_y = log_acc_estimator(correct, cfg.answer_samples, dtype=torch.float64)
            targets = [a if a is not None else t for a, t in zip(answers, targets)]
            self.record(f"{name}/answer_accuracy", correct.double().mean() / cfg.answer_samples)
        elif cfg.estimator == "gml":
            log_y = log_gml_estimator(prior.answer.double(), prior.answer_mask)
        else:
            log_y = log_likelihood_estimator(prior.answer.double(), prior.answer_mask)
        return torch.where(traces.valid, log_y, torch.full_like(log_y, -math.inf)), targets

    # ------------------------------------------------------------------ sequences with gradient
    def _collate(
        self, seqs: list[ScoringIds], ends: list[int], weights: torch.Tensor, index: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Sequences `index`, each as prompt `ids[:trace_start]` + completion `ids[trace_start:end]` (the
        tokens scored, `pack_completions`), with their weights."""
        chosen = [(seqs[i], ends[i]) for i in index.tolist()]
        prompts, targets = (
            [s.ids[: s.trace_start] for s, _ in chosen],
            [s.ids[s.trace_start : e] for s, e in chosen],
        )
        return {**pack_completions(prompts, targets, self.pad_id), "weights": weights[index].float()}

    def sequence_logprobs(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ_t log π(s_t|s_<t) over each sequence's completion tokens `[B]`, temperature 1, with gradient."""
        logp, _ = completion_logprobs(model, batch, Warpers(), chunk_size=self.config.logprob_chunk_size)
        return masked_sum(logp, batch["completion_mask"].to(logp.device), dim=-1)

    def _split(self, count: int, parts: int, keep: torch.Tensor, seed: int) -> list[torch.Tensor]:
        """`parts` shuffled index sets over the rows with `keep`, topped up with other rows when there
        are fewer kept rows than parts (every micro-batch needs a row to run its forward)."""
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
        kept = order[keep[order]]
        if len(kept) < parts:
            kept = torch.cat([kept, order[~keep[order]][: parts - len(kept)]])
        return list(torch.tensor_split(kept, parts))

    # ------------------------------------------------------------------ φ-step
    def phi_step(self, rows: list[dict[str, Any]], index: int = 0) -> None:
        """One φ update on fresh rollouts (forward KL from π_θ's traces, or reverse KL from q_φ's)."""
        tag = f"phi{index}"
        forward = self.config.posterior_objective == "forward_kl"
        role, key = ("theta", "prompt_ids") if forward else ("phi", "posterior_prompt_ids")
        sampling, n = self.generation_sampling(), self.config.num_generations
        seeds = self._seeds(tag, len(rows))
        traces = self._traces(rows, self._sample(role, [r[key] for r in rows], sampling, n, seeds))
        self.phi_update(rows, traces, tag)

    def phi_update(self, rows: list[dict[str, Any]], traces: Traces, tag: str = "phi0") -> None:
        """The φ update on given traces: from π_θ (forward KL, Eq. 9) or from q_φ (reverse KL)."""
        cfg = self.config
        n = cfg.num_generations
        if cfg.posterior_objective == "forward_kl":
            prior = self._prior_scores(rows, traces) if cfg.estimator != "acc" else None
            log_y, targets = self._log_estimator(rows, traces, prior, "prior", f"{tag}-answers")
            weights = forward_kl_posterior_weights(log_y.view(len(rows), n)).reshape(-1)
            seqs = self._scoring(rows, traces, targets, "posterior_prompt_ids")
            ends = [len(s.ids) for s in seqs]
            self.record("prior/accuracy", traces.correct.float().mean())
            self.record("prior/valid", traces.valid.float().mean())
        else:
            prior = self._prior_scores(rows, traces)
            log_l = log_likelihood_estimator(prior.answer.double(), prior.answer_mask)
            reward = (prior.trace + log_l - self._posterior_trace_logp(rows, traces)).view(len(rows), n)
            # the per-question mean baseline; advantages can be negative (signed weights)
            weights = (reward - reward.mean(dim=1, keepdim=True)).reshape(-1)
            seqs = self._scoring(rows, traces, self._reference_answers(rows, traces), "posterior_prompt_ids")
            ends = [s.answer_start for s in seqs]
            self.record("phi/reverse_kl_reward", reward.mean())
        loss = self._phi_update(seqs, ends, weights, num_questions=len(rows))
        self.record("loss/phi", loss)

    def _phi_update(
        self, seqs: list[ScoringIds], ends: list[int], weights: torch.Tensor, num_questions: int
    ) -> float:
        """φ's step (`SideParameters.step`: gradients averaged over ranks, clipped, AdamW) on
        −(1/Q) Σ_i w_i log q_φ(s_i), accumulated over micro-batches; returns the loss."""
        cfg = self.config
        size = self.args.per_device_train_batch_size
        keep = weights != 0
        signal = torch.tensor(float(keep.any()), device=self.args.device)
        if self.accelerator.num_processes > 1:  # every rank takes the same branch: the step is a collective
            signal = self.accelerator.reduce(signal, reduction="sum")
        if not signal:  # no trace carries weight: an Adam step on zero gradients would still move φ
            self.record("phi/skipped", 1.0)
            return 0.0
        self.record("phi/skipped", 0.0)
        parts = math.ceil(int(keep.sum()) / size)
        seed = self.args.seed + 1000 * self.state.global_step + self.phi_updates
        self.phi.zero_grad(set_to_none=True)
        total = 0.0
        for index in self._split(len(seqs), parts, keep, seed) if parts else []:
            batch = self._collate(seqs, ends, weights, index)
            logq = self.sequence_logprobs(self.phi, batch)
            w = batch["weights"].to(logq.device)
            if cfg.posterior_objective == "forward_kl":
                loss = weighted_posterior_nll(w, logq) / num_questions
            else:  # signed weights: weighted_posterior_nll keeps only positive ones
                loss = -(w * logq).sum() / num_questions
            loss.backward()
            total += float(loss.detach())
        grad_norm = self.phi_side.step()
        if grad_norm is not None:
            self.record("phi/grad_norm", grad_norm)
        return total

    # ------------------------------------------------------------------ θ-step
    def micro_batches(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Hook: the φ-steps first (every `theta_steps`-th step), then the θ-step's fresh micro-batches."""
        cfg = self.config
        if cfg.phi_steps and self.state.global_step % cfg.theta_steps == 0:
            with self.timed("phi_step"):
                for index in range(cfg.phi_steps):
                    self.phi_step(rows, index)
        return self.theta_batch(rows)

    def theta_batch(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """K fresh traces per question from q_φ, their Eq. 8 weights ρ̃, the IWAE bound: θ's micro-batches."""
        prompts = [r["posterior_prompt_ids"] for r in rows]
        seeds = self._seeds("theta", len(rows))
        groups = self._sample("phi", prompts, self.generation_sampling(), self.config.num_generations, seeds)
        return self.theta_micro_batches(rows, self._traces(rows, groups))

    def theta_micro_batches(self, rows: list[dict[str, Any]], traces: Traces) -> list[dict[str, Any]]:
        """The θ micro-batches of given posterior traces (K per question, question-major)."""
        cfg = self.config
        n, num_questions = cfg.num_generations, len(rows)
        with self.timed("scoring"):
            prior = self._prior_scores(rows, traces)
            log_q = self._posterior_trace_logp(rows, traces)
        log_y, targets = self._log_estimator(rows, traces, prior, "posterior", "theta-answers")
        lengths = prior.trace_length.clamp(min=1)
        log_rho = practical_log_weights(prior.trace, log_q, lengths, log_y)
        rho = normalized_weights(log_rho.view(num_questions, n))
        # the bound with the true weight π(z, Y|x)/q(z|x, y′) (L estimator, every trace)
        log_l = log_likelihood_estimator(prior.answer.double(), prior.answer_mask)
        bound = iwae_bound((prior.trace + log_l).view(num_questions, n), log_q.view(num_questions, n))
        self._record_theta(traces, rho, bound, lengths)

        seqs = self._scoring(rows, traces, targets, "prompt_ids")
        weights = rho.reshape(-1).float()
        solved = rho.sum(dim=1) > 0
        self.record("theta/fallback_questions", (~solved).float().mean())
        if cfg.fallback_to_reference:
            for q in (~solved).nonzero().flatten().tolist():
                solution = encode(self.processing_class, str(rows[q]["solution"]))
                answer = str(rows[q][cfg.answer_column])
                seqs.append(self.layout(list(rows[q]["prompt_ids"]), solution, answer))
                weights = torch.cat([weights, torch.ones(1)])
        ends = [len(s.ids) for s in seqs]
        seed = self.args.seed + self.state.global_step
        micro = []
        for index in self._split(len(seqs), self.steps_per_generation, weights != 0, seed):
            micro.append(
                {
                    **self._collate(seqs, ends, weights, index),
                    "num_questions": torch.tensor(float(num_questions)),
                }
            )
        if traces.groups is not None:  # the base's completion metrics and log, with q_φ's hint prompts
            batch = {
                **self.collate_rollouts(traces.groups),
                "rewards": traces.correct.float(),
                "weights": rho.reshape(-1),
            }
            shown = [{**row, "prompt": row["posterior_prompt"]} for row in rows]
            self.log_generation(shown, traces.groups, traces.rewards, batch)
        return micro

    def _record_theta(
        self, traces: Traces, rho: torch.Tensor, bound: torch.Tensor, lengths: torch.Tensor
    ) -> None:
        solved = rho.sum(dim=1) > 0
        self.record("iwae_bound", bound.mean())
        if solved.any():
            ess = 1.0 / (rho[solved] ** 2).sum(dim=1)
            self.record("theta/ess", ess.mean())
            correct = traces.correct.view_as(rho)[solved].double()
            self.record("theta/weight_on_correct", (rho[solved] * correct).sum(dim=1).mean())
        self.record("posterior/accuracy", traces.correct.float().mean())
        self.record("posterior/valid", traces.valid.float().mean())
        self.record("posterior/trace_length", lengths.float().mean())

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        """−(1/Q) Σ_i ρ̃_i log π_θ(z_i, y_i|x) over this micro-batch's rows (`loss_reduction = "sum"`: the
        micro-batches of one step sum to the θ-step loss)."""
        logp = self.sequence_logprobs(model, batch)
        weights = batch["weights"].to(logp.device)
        loss = weighted_posterior_nll(weights, logp) / batch["num_questions"].to(logp.device)
        # `loss/theta` is the step's sum: each of its `steps_per_generation` micro-batches logs S × its part
        return LossOutput(loss, {"loss/theta": loss.detach() * self.steps_per_generation})

    # ------------------------------------------------------------------ checkpoints
    def load_trainer_extra_state(self, state: dict[str, Any]) -> None:
        """φ (weights, AdamW state, step count) is restored as side parameters; the engines must re-sync."""
        self._engine_holds.clear()
