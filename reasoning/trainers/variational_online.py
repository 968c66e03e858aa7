"""Online variational reasoning: Algorithm 1 of Zhou et al. (2025) with fresh rollouts every step.

The offline pipeline (`trainers/variational.py`) runs one round of Algorithm 1 as stages. This
trainer alternates the two steps inside one training loop, each on fresh rollouts:

- φ-step (`phi_steps` per cycle, its own AdamW), forward KL (Eq. 9): M traces z_1..M ~ π_θ(z|x)
  (prior prompt), weights w̃_m = π̂(Y|x, z_m) / Σ_j π̂(Y|x, z_j) (the configured estimator, usually
  Acc), loss −(1/Q) Σ_q Σ_m w̃_qm log q_φ(z_qm, y|x, y′) over the Q questions of the step, under the
  posterior template (q is trained on the whole completion it will be asked to write — trace,
  answer marker and answer — as the pipeline's forward-KL stage does). `posterior_objective:
  reverse_kl` instead samples K traces from q_φ and takes the score-function step
  −(1/Q) Σ_q Σ_k (r_qk − r̄_q) log q_φ(z_qk|x, y′), r = log π_θ(z, Y|x) − log q_φ(z|x, y′) (the
  reverse KL, for comparison: it is the one the paper found to collapse into answer-leaking traces).
- θ-step (one optimizer step of the transformers Trainer): K traces z_1..K ~ q_φ(z|x, y′), the
  practical weights of Eq. 8, log ρ_k = (log π_θ(z_k|x) − log q_φ(z_k|x, y′)) / |z_k| +
  log π̂_θ(Y|x, z_k), ρ̃ = softmax over the question's K traces, and the loss
  −(1/Q) Σ_q Σ_k ρ̃_qk log π_θ(z_qk, y_qk|x) (weighted SFT of trace + answer under the prior
  template). A trace without the answer marker or cut by the token budget has ρ = 0; a question
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
answer (the reference answer when none was), as in the pipeline.

Engines: with the `hf` engine each model has its own `HFEngine` wrapping the live model (no copy,
no sync). With vLLM one engine serves both and is re-synced when the other model's weights are
needed (3 syncs per step): measured here on the 1M model a sync takes 11 ms, a second colocated
engine 1.5 s to start plus its own KV cache, so one engine costs less memory for the same time.
The mathematics is in `objectives/variational.py`; this file samples, scores and steps.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from reasoning.data.templates import ScoringIds, add_posterior_prompts, encode, scoring_ids, split_trace
from reasoning.models.scoring import final_states, span_token_logprobs, states_token_logprobs
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
from reasoning.trainers.base import RolloutTrainer, RolloutTrainerConfig
from reasoning.trainers.variational import ESTIMATORS

POSTERIOR_OBJECTIVES = ("forward_kl", "reverse_kl")


@dataclass
class OnlineVariationalConfig(RolloutTrainerConfig):
    """The `variational_online:` section of a recipe. `num_generations` is K (traces from q_φ per
    question in a θ-step) and M (traces from π_θ per question in a forward-KL φ-step)."""

    estimator: str = field(
        default="acc", metadata={"help": "Estimator of π_θ(Y|x,z) in both weights: acc, gml or l (Eq. 8)."}
    )
    posterior_objective: str = field(
        default="forward_kl",
        metadata={
            "help": "φ-step: forward_kl (Eq. 9, traces from π_θ weighted by π̂(Y|x,z)) or reverse_kl "
            "(score function on q's own traces with reward log π_θ(z,Y|x) − log q_φ; for comparison)."
        },
    )
    answer_samples: int = field(
        default=4, metadata={"help": "Acc: answers sampled from π_θ after each trace (0 only with gml/l)."}
    )
    answer_temperature: float = field(default=0.7, metadata={"help": "Temperature of those answers."})
    answer_max_tokens: int = field(default=16, metadata={"help": "Token budget of a sampled answer."})
    correct_threshold: float = field(
        default=1.0,
        metadata={"help": "A completion is correct when its combined reward is at least this."},
    )
    phi_learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate of φ's AdamW."})
    phi_weight_decay: float = field(default=0.0, metadata={"help": "Weight decay of φ's AdamW."})
    phi_max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "Clip φ's gradient norm to this (null = no clipping)."}
    )
    phi_steps: int = field(
        default=1, metadata={"help": "φ-steps per cycle, each on fresh rollouts (0 = q_φ stays fixed)."}
    )
    theta_steps: int = field(
        default=1, metadata={"help": "θ-steps (Trainer optimizer steps) per cycle; φ-steps come first."}
    )
    shared_posterior: bool = field(
        default=False,
        metadata={
            "help": "q_φ is π_θ's own network with the hint template (as in CoVRL), not a second model."
        },
    )
    posterior_path: str | None = field(
        default=None,
        metadata={"help": "Checkpoint q_φ starts from (e.g. a hint-SFT posterior); default: a copy of θ."},
    )
    hint_column: str = field(default="answer", metadata={"help": "Column shown to q_φ as the hint y′."})
    answer_column: str = field(default="answer", metadata={"help": "Column holding the reference answer."})
    hint_after: bool = field(
        default=False,
        metadata={"help": "Posterior order answer-then-explanation instead of hint-then-trace."},
    )
    fallback_to_reference: bool = field(
        default=True,
        metadata={"help": "A question with no weighted trace trains θ on its reference solution (weight 1)."},
    )
    scoring_batch_size: int = field(
        default=64, metadata={"help": "Sequences per forward when scoring traces and answers."}
    )

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.posterior_objective not in POSTERIOR_OBJECTIVES:
            raise ValueError(
                f"posterior_objective must be one of {POSTERIOR_OBJECTIVES}, got {self.posterior_objective!r}"
            )
        if self.estimator == "acc" and self.answer_samples < 1:
            raise ValueError("estimator 'acc' needs answer_samples >= 1 (answers sampled after each trace)")
        if self.phi_steps < 0 or self.theta_steps < 1:
            raise ValueError(
                f"need phi_steps >= 0 and theta_steps >= 1, got {self.phi_steps}, {self.theta_steps}"
            )
        if self.shared_posterior and self.posterior_path:
            raise ValueError(
                "shared_posterior uses θ's own network as q_φ: remove posterior_path (or the flag)"
            )
        if self.num_iterations != 1:
            raise ValueError(
                f"the online trainer samples fresh rollouts for every step: num_iterations must be 1, "
                f"got {self.num_iterations}"
            )


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


class OnlineVariationalTrainer(RolloutTrainer):
    """Alternating φ- and θ-steps on fresh rollouts (see the module docstring).

    Extra arguments: `posterior_model` (q_φ; default from `config.posterior_path` or a copy of θ)
    and `posterior_engine` (the engine that samples q_φ; default: an `HFEngine` on q_φ when the main
    engine is an `HFEngine`, else the main engine, re-synced).
    """

    config: OnlineVariationalConfig

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
                raise ValueError(
                    "shared_posterior steps θ's parameters outside DeepSpeed; not supported with it"
                )
            self.phi = theta
        elif posterior_model is not None:
            self.phi = posterior_model
        elif cfg.posterior_path:
            self.phi = AutoModelForCausalLM.from_pretrained(cfg.posterior_path, dtype=theta.dtype)
        else:
            self.phi = self.policy_copy(frozen=False)  # under ZeRO-3: gathered into a full model
        self.phi.to(self.args.device)
        self.phi.train()
        self.phi_optimizer = torch.optim.AdamW(
            self.phi.parameters(), lr=cfg.phi_learning_rate, weight_decay=cfg.phi_weight_decay
        )
        self.phi_updates = 0
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
        tokenizer = self.processing_class
        self._marker_ids = encode(tokenizer, self.template.answer_prefix)
        self._stop_ids = {tokenizer.eos_token_id, *self.sampling.stop_token_ids} - {None}
        self._theta_loss = 0.0

    # ------------------------------------------------------------------ data
    def _prepare_prompts(self, dataset: Dataset, tokenizer: PreTrainedTokenizerBase) -> Dataset:
        """Prior prompts (the base) plus the posterior prompt with the hint, as text and ids."""
        cfg = self.config
        if cfg.answer_column not in dataset.column_names:
            raise ValueError(
                f"variational_online needs the answer column {cfg.answer_column!r}; the data has "
                f"{dataset.column_names}"
            )
        dataset = super()._prepare_prompts(dataset, tokenizer)
        return add_posterior_prompts(
            dataset, self.template, tokenizer, cfg.hint_column, cfg.hint_after, cfg.max_prompt_length
        )

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
            start = time.monotonic()
            engine.sync_weights(model)
            self._engine_holds[id(engine)] = key
            self.sync_count += 1
            self._metrics["time/sync"].append(time.monotonic() - start)
        return engine

    def sync_engine(self) -> None:
        self.engine_for("theta")

    def _seeds(self, tag: str, count: int) -> list[int] | None:
        """One seed per prompt, from (seed, step, tag, global position): rank-independent, repeated on resume."""
        if self.sampling.seed is None:
            return None
        first = self.args.process_index * count
        step = self.state.global_step
        return [
            random.Random(f"{self.sampling.seed}-{step}-{tag}-{first + i}").getrandbits(31)
            for i in range(count)
        ]

    def _sample(
        self, role: str, prompts: list[list[int]], sampling: Sampling, n: int, seeds: list[int] | None
    ) -> list[list[Rollout]]:
        engine = self.engine_for(role)
        start = time.monotonic()
        groups = engine.generate(prompts, sampling, n=n, seeds=seeds)
        self._metrics["time/generation"].append(time.monotonic() - start)
        return groups

    def _traces(self, rows: list[dict[str, Any]], groups: list[list[Rollout]]) -> Traces:
        """Each rollout cut at its answer marker's tokens, and its own answer graded."""
        question, ids, texts, valid, completions = [], [], [], [], []
        for i, group in enumerate(groups):
            for rollout in group:
                trace, found = split_trace(
                    rollout.completion_ids, self._marker_ids, self._stop_ids, rollout.finish_reason == "stop"
                )
                question.append(i)
                ids.append(trace)
                texts.append(self.processing_class.decode(trace, skip_special_tokens=True))
                valid.append(found and not rollout.truncated and len(trace) > 0)
                completions.append(rollout)
        table = self._reward_table(
            rows, question, [r.text for r in completions], [r.completion_ids for r in completions]
        )
        correct = self.combine_rewards(table) >= self.config.correct_threshold
        return Traces(question, ids, texts, torch.tensor(valid, dtype=torch.bool), correct, table, groups)

    def _reward_table(
        self, rows: list[dict[str, Any]], question: list[int], texts: list[str], ids: list[list[int]]
    ) -> torch.Tensor:
        """Rewards `[N, F]` of completion i (text `texts[i]`, for row `question[i]`)."""
        keys = [
            k
            for k in rows[0]
            if k not in ("prompt", "prompt_ids", "posterior_prompt", "posterior_prompt_ids")
        ]
        columns: dict[str, Any] = {k: [rows[q][k] for q in question] for k in keys}
        columns["trainer_state"] = self.state
        start = time.monotonic()
        table = self.call_rewards(self.reward_funcs, [rows[q]["prompt"] for q in question], texts, ids, columns)
        self._metrics["time/reward"].append(time.monotonic() - start)
        return table

    # ------------------------------------------------------------------ scoring
    def _scoring(
        self, rows: list[dict[str, Any]], traces: Traces, answers: list[str], prompt: str
    ) -> list[ScoringIds]:
        """prompt (`prompt_ids` or `posterior_prompt_ids`) + trace + marker + answer (+ EOS), per trace."""
        return [
            scoring_ids(self.template, self.processing_class, list(rows[q][prompt]), trace, answer)
            for q, trace, answer in zip(traces.question, traces.ids, answers)
        ]

    def _reference_answers(self, rows: list[dict[str, Any]], traces: Traces) -> list[str]:
        return [str(rows[q][self.config.answer_column]) for q in traces.question]

    @torch.no_grad()
    def _span_logprobs(
        self, model: torch.nn.Module, seqs: list[ScoringIds], trace_only: bool
    ) -> list[torch.Tensor]:
        """Per-token log-probs (temperature 1) of each trace + marker (+ answer unless `trace_only`)."""
        was_training = model.training
        model.eval()
        try:
            return span_token_logprobs(
                model,
                [s.ids[: s.answer_start] if trace_only else s.ids for s in seqs],
                [s.trace_start for s in seqs],
                pad_id=self.processing_class.pad_token_id or 0,
                batch_size=self.config.scoring_batch_size,
            )
        finally:
            model.train(was_training)

    def _prior_scores(self, rows: list[dict[str, Any]], traces: Traces) -> dict[str, torch.Tensor]:
        """Under π_θ (prior prompt, reference answer): log π(z|x) `[N]`, |z| `[N]` (trace + marker),
        the answer's token log-probs `answer_logp` `[N, A]` and `answer_mask`."""
        seqs = self._scoring(rows, traces, self._reference_answers(rows, traces), "prompt_ids")
        spans = self._span_logprobs(self.accelerator.unwrap_model(self.model), seqs, trace_only=False)
        lengths = [s.answer_start - s.trace_start for s in seqs]
        width = max(max(len(span) - n for span, n in zip(spans, lengths)), 1)
        answer_logp = torch.zeros(len(seqs), width, dtype=torch.float64)
        answer_mask = torch.zeros(len(seqs), width, dtype=torch.bool)
        for i, (span, n) in enumerate(zip(spans, lengths)):
            answer_logp[i, : len(span) - n] = span[n:].double()
            answer_mask[i, : len(span) - n] = True
        return {
            "trace_logp": torch.tensor([float(span[:n].double().sum()) for span, n in zip(spans, lengths)]),
            "trace_length": torch.tensor(lengths),
            "answer_logp": answer_logp,
            "answer_mask": answer_mask,
        }

    def _posterior_trace_logp(self, rows: list[dict[str, Any]], traces: Traces) -> torch.Tensor:
        """log q_φ(z|x, y′) `[N]` of each trace + marker under the posterior prompt."""
        seqs = self._scoring(rows, traces, self._reference_answers(rows, traces), "posterior_prompt_ids")
        spans = self._span_logprobs(self.phi, seqs, trace_only=True)
        return torch.tensor([float(span.double().sum()) for span in spans], dtype=torch.float64)

    def _accuracy(
        self, rows: list[dict[str, Any]], traces: Traces, tag: str
    ) -> tuple[torch.Tensor, list[str | None]]:
        """Acc: correct counts `[N]` among `answer_samples` answers sampled from π_θ after each trace,
        and one correct answer per trace (None when there is none)."""
        cfg = self.config
        # only valid traces are asked for answers: the others get weight 0 whatever they answer
        chosen = traces.valid.nonzero().flatten().tolist()
        prompts = [
            list(rows[traces.question[i]]["prompt_ids"]) + traces.ids[i] + self._marker_ids for i in chosen
        ]
        correct = torch.zeros(len(traces.ids), dtype=torch.long)
        answers: list[str | None] = [None] * len(traces.ids)
        if not chosen:
            return correct, answers
        sampling = Sampling(
            temperature=cfg.answer_temperature,
            max_tokens=cfg.answer_max_tokens,
            stop_token_ids=self.sampling.stop_token_ids,
            seed=self.sampling.seed,
        )
        seeds = self._seeds(tag, len(traces.ids))
        seeds = None if seeds is None else [seeds[i] for i in chosen]
        groups = self._sample("theta", prompts, sampling, cfg.answer_samples, seeds)
        texts, ids, question = [], [], []
        for i, group in zip(chosen, groups):
            for rollout in group:
                texts.append(traces.text[i] + self.template.answer_prefix + rollout.text)
                ids.append(list(traces.ids[i]) + self._marker_ids + list(rollout.completion_ids))
                question.append(traces.question[i])
        table = self._reward_table(rows, question, texts, ids)
        graded = (self.combine_rewards(table) >= cfg.correct_threshold).view(len(groups), cfg.answer_samples)
        correct[chosen] = graded.sum(dim=1)
        for j, (i, flags) in enumerate(zip(chosen, graded.tolist())):
            if any(flags):
                answers[i] = self.template.split_completion(
                    texts[j * cfg.answer_samples + flags.index(True)]
                )[1]
        return correct, answers

    def _log_estimator(
        self, rows: list[dict[str, Any]], traces: Traces, prior: dict[str, torch.Tensor], name: str, tag: str
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
            log_y = log_gml_estimator(prior["answer_logp"], prior["answer_mask"])
        else:
            log_y = log_likelihood_estimator(prior["answer_logp"], prior["answer_mask"])
        return torch.where(traces.valid, log_y, torch.full_like(log_y, -math.inf)), targets

    # ------------------------------------------------------------------ sequences with gradient
    def _collate(
        self, seqs: list[ScoringIds], ends: list[int], weights: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Right-padded ids with `target_mask` [B, W − 1] on the tokens [trace_start, end) of each sequence."""
        pad = self.processing_class.pad_token_id or 0
        width = max(len(s.ids) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        attention = torch.zeros((len(seqs), width), dtype=torch.long)
        target = torch.zeros((len(seqs), width - 1), dtype=torch.long)
        for i, (s, end) in enumerate(zip(seqs, ends)):
            ids[i, : len(s.ids)] = torch.tensor(s.ids, dtype=torch.long)
            attention[i, : len(s.ids)] = 1
            target[i, s.trace_start - 1 : end - 1] = 1  # position t predicts token t + 1
        return {
            "input_ids": ids,
            "attention_mask": attention,
            "target_mask": target,
            "weights": weights.float(),
        }

    def sequence_logprobs(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ_t log π(s_t|s_<t) over each sequence's target tokens `[B]`, temperature 1, with gradient."""
        device = next(model.parameters()).device
        ids = batch["input_ids"].to(device)
        # hidden states, or logits under ZeRO-3 (the head weight is a partition outside the forward)
        states, head, _ = final_states(
            model, self.accelerator.unwrap_model(model), ids, batch["attention_mask"].to(device), ids.shape[1]
        )
        logp, _ = states_token_logprobs(
            states[:, :-1], head, ids[:, 1:], chunk_size=self.config.logprob_chunk_size
        )
        return masked_sum(logp, batch["target_mask"].to(device), dim=-1)

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
        if self.config.posterior_objective == "forward_kl":
            role, key = "theta", "prompt_ids"
        else:
            role, key = "phi", "posterior_prompt_ids"
        sampling, n = self.generation_sampling(), self.config.num_generations
        seeds = self._seeds(tag, len(rows))
        traces = self._traces(rows, self._sample(role, [r[key] for r in rows], sampling, n, seeds))
        self.phi_update(rows, traces, tag)

    def phi_update(self, rows: list[dict[str, Any]], traces: Traces, tag: str = "phi0") -> None:
        """The φ update on given traces: from π_θ (forward KL, Eq. 9) or from q_φ (reverse KL)."""
        cfg = self.config
        n = cfg.num_generations
        if cfg.posterior_objective == "forward_kl":
            prior = self._prior_scores(rows, traces) if cfg.estimator != "acc" else {}
            log_y, targets = self._log_estimator(rows, traces, prior, "prior", f"{tag}-answers")
            weights = forward_kl_posterior_weights(log_y.view(len(rows), n)).reshape(-1)
            seqs = self._scoring(rows, traces, targets, "posterior_prompt_ids")
            ends = [len(s.ids) for s in seqs]
            self.record("prior/accuracy", traces.correct.float().mean())
            self.record("prior/valid", traces.valid.float().mean())
        else:
            prior = self._prior_scores(rows, traces)
            reward = (
                prior["trace_logp"].double()
                + log_likelihood_estimator(prior["answer_logp"], prior["answer_mask"])
                - self._posterior_trace_logp(rows, traces)
            ).view(len(rows), n)
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
        """AdamW step of φ on −(1/Q) Σ_i w_i log q_φ(s_i), accumulated over micro-batches; returns the loss."""
        cfg = self.config
        size = self.args.per_device_train_batch_size
        keep = weights != 0
        distributed = self.args.world_size > 1 and torch.distributed.is_initialized()
        signal = torch.tensor(float(keep.any()), device=self.args.device)
        if distributed:  # every rank must take the same branch: the gradient average is a collective
            torch.distributed.all_reduce(signal, op=torch.distributed.ReduceOp.MAX)
        if not signal:  # no trace carries weight: an Adam step on zero gradients would still move φ
            self.record("phi/skipped", 1.0)
            return 0.0
        self.record("phi/skipped", 0.0)
        parts = math.ceil(int(keep.sum()) / size)
        seed = self.args.seed + 1000 * self.state.global_step + self.phi_updates
        self.phi_optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for index in self._split(len(seqs), parts, keep, seed) if parts else []:
            batch = self._collate([seqs[i] for i in index], [ends[i] for i in index], weights[index])
            logq = self.sequence_logprobs(self.phi, batch)
            w = batch["weights"].to(logq.device)
            if cfg.posterior_objective == "forward_kl":
                loss = weighted_posterior_nll(w, logq) / num_questions
            else:  # signed weights: weighted_posterior_nll keeps only positive ones
                loss = -(w * logq).sum() / num_questions
            loss.backward()
            total += float(loss.detach())
        params = [p for p in self.phi.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if distributed:
            # φ lives outside the DDP/DeepSpeed wrapper: average its gradients over ranks by hand
            # (SUM then divide: gloo, the CPU backend, has no AVG)
            for p in params:
                torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
                p.grad.div_(self.args.world_size)
        if cfg.phi_max_grad_norm is not None and params:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.phi_max_grad_norm)
            self.record("phi/grad_norm", grad_norm)
        self.phi_optimizer.step()
        self.phi_optimizer.zero_grad(set_to_none=True)
        self.phi_updates += 1
        return total

    # ------------------------------------------------------------------ θ-step
    def theta_batch(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """K fresh traces per question from q_φ, their Eq. 8 weights ρ̃, the IWAE bound; the θ micro-batches."""
        prompts = [r["posterior_prompt_ids"] for r in rows]
        seeds = self._seeds("theta", len(rows))
        groups = self._sample("phi", prompts, self.generation_sampling(), self.config.num_generations, seeds)
        return self.theta_micro_batches(rows, self._traces(rows, groups))

    def theta_micro_batches(self, rows: list[dict[str, Any]], traces: Traces) -> list[dict[str, Any]]:
        """The θ micro-batches of given posterior traces (K per question, question-major)."""
        cfg = self.config
        n, num_questions = cfg.num_generations, len(rows)
        start = time.monotonic()
        prior = self._prior_scores(rows, traces)
        log_q = self._posterior_trace_logp(rows, traces)
        self._metrics["time/scoring"].append(time.monotonic() - start)
        log_y, targets = self._log_estimator(rows, traces, prior, "posterior", "theta-answers")
        lengths = prior["trace_length"].clamp(min=1)
        log_rho = practical_log_weights(prior["trace_logp"].double(), log_q, lengths, log_y)
        rho = normalized_weights(log_rho.view(num_questions, n))
        # the bound with the true weight π(z, Y|x)/q(z|x, y′) (L estimator, every trace)
        log_l = log_likelihood_estimator(prior["answer_logp"], prior["answer_mask"])
        bound = iwae_bound(
            (prior["trace_logp"].double() + log_l).view(num_questions, n), log_q.view(num_questions, n)
        )
        self._record_theta(traces, rho, bound, lengths)

        seqs = self._scoring(rows, traces, targets, "prompt_ids")
        weights = rho.reshape(-1).float()
        solved = rho.sum(dim=1) > 0
        self.record("theta/fallback_questions", (~solved).float().mean())
        if cfg.fallback_to_reference:
            for q in (~solved).nonzero().flatten().tolist():
                solution = encode(self.processing_class, str(rows[q]["solution"]))
                answer = str(rows[q][cfg.answer_column])
                seqs.append(
                    scoring_ids(
                        self.template, self.processing_class, list(rows[q]["prompt_ids"]), solution, answer
                    )
                )
                weights = torch.cat([weights, torch.ones(1)])
        ends = [len(s.ids) for s in seqs]
        seed = self.args.seed + self.state.global_step
        micro = []
        for index in self._split(len(seqs), self.steps_per_generation, weights != 0, seed):
            batch = self._collate([seqs[i] for i in index], [ends[i] for i in index], weights[index])
            batch["num_questions"] = torch.tensor(float(num_questions))
            micro.append(batch)
        if traces.groups is not None:
            self._log_theta_completions(rows, traces.groups, traces, rho)
        return micro

    @torch.no_grad()
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

    def _log_theta_completions(
        self, rows: list[dict[str, Any]], groups: list[list[Rollout]], traces: Traces, rho: torch.Tensor
    ) -> None:
        """The base's completion metrics and log, with the posterior samples' correctness as reward."""
        batch = self.collate_rollouts(groups)
        batch["rewards"] = traces.correct.float()
        batch["weights"] = rho.reshape(-1)
        shown = [{**row, "prompt": row["posterior_prompt"]} for row in rows]  # q_φ was prompted with the hint
        self._log_generation(shown, groups, traces.rewards, batch)

    def _generate_and_buffer(self, rows: list[dict[str, Any]]) -> None:
        """φ-steps first (every `theta_steps`-th step), then the θ-step's fresh batch from q_φ."""
        cfg = self.config
        if cfg.phi_steps and self.state.global_step % cfg.theta_steps == 0:
            start = time.monotonic()
            for index in range(cfg.phi_steps):
                self.phi_step(rows, index)
            self._metrics["time/phi_step"].append(time.monotonic() - start)
        self._buffer = self.theta_batch(rows)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """−(1/Q) Σ_i ρ̃_i log π_θ(z_i, y_i|x) over this micro-batch's rows (the micro-batches of one
        step sum to the θ-step loss, so no further accumulation scaling)."""
        logp = self.sequence_logprobs(model, batch)
        weights = batch["weights"].to(logp.device)
        loss = weighted_posterior_nll(weights, logp) / batch["num_questions"].to(logp.device)
        self._theta_loss += float(loss.detach())
        if self._micro_step % self.steps_per_generation == 0:  # the step's last micro-batch was served
            self.record("loss/theta", self._theta_loss)
            self._theta_loss = 0.0
        return loss

    # ------------------------------------------------------------------ checkpoints
    def trainer_extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "phi_updates": self.phi_updates,
            "phi_optimizer": self.phi_optimizer.state_dict(),
        }
        if not self.config.shared_posterior:  # a shared φ is θ, saved by the Trainer
            state["phi"] = {k: v.detach().cpu() for k, v in self.phi.state_dict().items()}
        return state

    def load_trainer_extra_state(self, state: dict[str, Any]) -> None:
        if "phi" in state:
            self.phi.load_state_dict(state["phi"])
        if "phi_optimizer" in state:
            self.phi_optimizer.load_state_dict(state["phi_optimizer"])
        self.phi_updates = int(state.get("phi_updates", 0))
        self._engine_holds.clear()
