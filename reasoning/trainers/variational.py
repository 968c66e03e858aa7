"""Variational reasoning (Zhou et al., 2025): the released pipeline as stages that resume.

Thinking traces z are latent variables of log P(Y|x). With a posterior q_φ(z|x, y′) that sees an
answer hint y′, the multi-trace bound L^K = E[log (1/K) Σ_k π(z_k, Y|x)/q(z_k|x, y′)] has the
θ-gradient E[Σ_k ρ̃_k ∇ log π(z_k, Y|x)] (Eq. 6): weighted SFT on posterior samples. The practical
weight (Eq. 8) is ρ_k = (π(z_k|x)/q(z_k|x, y′))^{1/|z_k|} · π̂(Y|x, z_k) with π̂ one of Acc, GML, L.

Stages (each writes under `<run_dir>/<stage>/` and a `DONE` marker; a finished stage is skipped
on rerun, an interrupted SFT stage resumes from its last checkpoint):

1. `prior`     π_θ0: SFT of the base model with the Dr. SFT loss;
2. `posterior` q_φ: SFT of the base model with the hint template (hint then trace, or answer then
               explanation with `hint_after`);
3. `samples`   K traces per question from q_φ (from π_θ0 with `no_hint`, the paper's ablation);
4. `scores`    log π_θ0(z|x), log q_φ(z|x, y′) and the reference answer's token log-probs under
               π_θ0 after the trace (appended at a token boundary, `templates.scoring_ids`);
5. `accuracy`  answers sampled from π_θ0 after each trace, graded (the Acc estimator);
6. `weights`   log ρ (Eq. 8), filters (no answer marker, over-length, zero accuracy), ρ̃ within each
               question, fallback to the original sample when no trace survives; the final SFT
               dataset and statistics (IWAE bounds for K' = 1, 2, 4, …, K, effective sample size);
7. `final`     SFT on that dataset: all traces with weights K·ρ̃ (mean weight 1 per question), or
               the argmax trace per question mixed with the original data.

Every dataset is saved with `Dataset.save_to_disk` under the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, concatenate_datasets, load_from_disk
from rich.console import Console
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase, TrainingArguments

from reasoning.data.templates import Template, encode, scoring_ids, template_for
from reasoning.models.scoring import span_token_logprobs
from reasoning.objectives.variational import (
    iwae_bound,
    log_acc_estimator,
    log_gml_estimator,
    log_likelihood_estimator,
    normalized_weights,
    practical_log_weights,
)
from reasoning.rewards.verifier import is_correct
from reasoning.rollout import Sampling
from reasoning.trainers.sft import SFTConfig, make_sft_trainer

ESTIMATORS = ("acc", "gml", "l")
FINAL_DATA = ("weighted", "argmax")


@dataclass
class VariationalConfig:
    """The `variational:` section of a recipe."""

    estimator: str = field(
        default="acc", metadata={"help": "Estimator of π(Y|x,z) in the weight: acc, gml or l (Eq. 8)."}
    )
    num_traces: int = field(default=8, metadata={"help": "K: traces sampled per question from q_φ."})
    trace_temperature: float = field(default=0.7, metadata={"help": "Sampling temperature of the traces."})
    answer_samples: int = field(
        default=8, metadata={"help": "Answers sampled from π_θ0 after each trace for Acc (0 = skip)."}
    )
    answer_temperature: float = field(default=0.7, metadata={"help": "Temperature of those answers."})
    answer_max_tokens: int = field(default=32, metadata={"help": "Token budget of a sampled answer."})
    hint_column: str = field(
        default="answer", metadata={"help": "Column given to q_φ as the hint y′ (answer or solution)."}
    )
    hint_after: bool = field(
        default=False,
        metadata={"help": "Posterior order answer-then-explanation instead of hint-then-trace."},
    )
    no_hint: bool = field(
        default=False, metadata={"help": "Ablation: sample traces from π_θ0 (no hint) instead of q_φ."}
    )
    final_data: str = field(
        default="weighted",
        metadata={"help": "weighted: all traces with weights K·ρ̃; argmax: best trace + the original data."},
    )
    final_init: str = field(
        default="base", metadata={"help": "Model the final SFT starts from: base (paper) or prior."}
    )
    num_questions: int | None = field(
        default=None, metadata={"help": "Sample traces for at most this many training questions."}
    )
    prior_path: str | None = field(
        default=None, metadata={"help": "An existing prior checkpoint: skips stage 1."}
    )
    posterior_path: str | None = field(
        default=None, metadata={"help": "An existing posterior checkpoint: skips stage 2."}
    )
    prior_steps: int | None = field(
        default=None, metadata={"help": "max_steps of stage 1 (default: training)."}
    )
    posterior_steps: int | None = field(
        default=None, metadata={"help": "max_steps of stage 2 (default: training.max_steps)."}
    )
    final_steps: int | None = field(
        default=None, metadata={"help": "max_steps of stage 7 (default: training)."}
    )
    dr_sft: bool = field(
        default=True, metadata={"help": "Dr. SFT loss (global constant) in every SFT stage."}
    )
    max_length: int = field(default=512, metadata={"help": "Drop SFT samples longer than this many tokens."})
    scoring_batch_size: int = field(default=64, metadata={"help": "Batch size of teacher-forced scoring."})
    heldout: str | None = field(
        default=None,
        metadata={
            "help": "Held-out records (any data source) on which to measure the IWAE bound for K' ≤ K."
        },
    )
    heldout_questions: int = field(default=100, metadata={"help": "Held-out questions used for the bound."})

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.final_data not in FINAL_DATA:
            raise ValueError(f"final_data must be one of {FINAL_DATA}, got {self.final_data!r}")
        if self.final_init not in ("base", "prior"):
            raise ValueError(f"final_init must be 'base' or 'prior', got {self.final_init!r}")
        if self.num_traces < 1:
            raise ValueError(f"num_traces must be >= 1, got {self.num_traces}")
        if self.estimator == "acc" and self.answer_samples < 1:
            raise ValueError("estimator 'acc' needs answer_samples >= 1 (answers sampled after each trace)")


def find_last(ids: list[int], pattern: list[int]) -> int:
    """Start of the last occurrence of `pattern` in `ids`, or −1."""
    width = len(pattern)
    for start in range(len(ids) - width, -1, -1):
        if ids[start : start + width] == pattern:
            return start
    return -1


class VariationalReasoningPipeline:
    """Stages 1–7 of the released variational-reasoning pipeline, resumable stage by stage.

    Args:
        config: the `variational:` section.
        base_path: the base model (checkpoint directory or hub name) every SFT stage starts from.
        records: training records with `question`, `answer`, `solution` (and `task` for synthetic).
        training: TrainingArguments fields shared by the SFT stages (`output_dir` is the run dir).
        make_engine: `(model_path, model, tokenizer) -> RolloutEngine` for sampling.
        trace_max_tokens: token budget of a sampled trace (the rollout section's `max_tokens`).
    """

    def __init__(
        self,
        config: VariationalConfig,
        base_path: str,
        records: Dataset,
        training: dict[str, Any],
        make_engine: Callable[[str, Any, PreTrainedTokenizerBase], Any],
        trace_max_tokens: int = 256,
        console: Console | None = None,
    ) -> None:
        missing = {"question", "answer", "solution"} - set(records.column_names)
        if missing:
            raise ValueError(
                f"the variational pipeline needs records with question/answer/solution; missing {sorted(missing)}"
            )
        if config.hint_column not in records.column_names:
            raise ValueError(
                f"variational.hint_column {config.hint_column!r} is not a column of the data "
                f"({', '.join(records.column_names)})"
            )
        self.config = config
        self.base_path = base_path
        self.records = records
        self.training = dict(training)
        self.run_dir = Path(self.training["output_dir"])
        self.make_engine = make_engine
        self.trace_max_tokens = trace_max_tokens
        self.console = console or Console(stderr=True)
        self.seed = int(self.training.get("seed", 0))

    # ------------------------------------------------------------------ stage bookkeeping
    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name

    def done(self, name: str) -> bool:
        return (self.stage_dir(name) / "DONE").exists()

    def _finish(self, name: str, info: dict[str, Any]) -> None:
        marker = self.stage_dir(name) / "DONE"
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2, default=str))
        os.replace(tmp, marker)  # atomic: a kill leaves either no marker or a whole one

    def _stage(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if self.done(name):
            self.console.print(f"[yellow]variational: stage {name!r} already done, skipping")
            return json.loads((self.stage_dir(name) / "DONE").read_text())
        self.console.print(f"[bold]variational: stage {name!r}")
        self.stage_dir(name).mkdir(parents=True, exist_ok=True)
        info = fn()
        self._finish(name, info)
        return info

    # ------------------------------------------------------------------ helpers
    @property
    def template(self) -> Template:
        return template_for(self.tokenizer)

    def _load(self, path: str):
        from transformers import AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer

    def _sft(self, name: str, init: str, records: Dataset, max_steps: int | None, posterior: bool) -> dict:
        from reasoning.recipes import latest_checkpoint
        from reasoning.trainers.callbacks import JsonlMetricsCallback

        out = self.stage_dir(name)
        values = {**self.training, "output_dir": str(out)}
        if max_steps is not None:
            values["max_steps"] = max_steps
        args = TrainingArguments(**values)
        model, tokenizer = self._load(init)
        sft = SFTConfig(
            max_length=self.config.max_length,
            dr_sft=self.config.dr_sft,
            posterior=posterior,
            hint_after=self.config.hint_after,
            hint_column=self.config.hint_column,
        )
        trainer = make_sft_trainer(
            model, tokenizer, records, args, sft, callbacks=[JsonlMetricsCallback(out / "metrics.jsonl")]
        )
        result = trainer.train(resume_from_checkpoint=latest_checkpoint(out))
        trainer.save_model(str(out / "final"))
        tokenizer.save_pretrained(out / "final")
        return {"path": str(out / "final"), "train_loss": result.training_loss, "samples": len(records)}

    def prior_path(self) -> str:
        return self.config.prior_path or str(self.stage_dir("prior") / "final")

    def posterior_path(self) -> str:
        if self.config.no_hint:
            return self.prior_path()
        return self.config.posterior_path or str(self.stage_dir("posterior") / "final")

    def sampled_questions(self) -> Dataset:
        n = len(self.records) if self.config.num_questions is None else self.config.num_questions
        return self.records.select(range(min(n, len(self.records))))

    def posterior_prompt(self, row: dict[str, Any]) -> str:
        if self.config.no_hint:
            return self.template.prior_prompt(row["question"], self.tokenizer)
        return self.template.posterior_prompt(
            row["question"],
            str(row[self.config.hint_column]),
            self.tokenizer,
            hint_after=self.config.hint_after,
        )

    # ------------------------------------------------------------------ stages
    def stage_samples(self) -> dict[str, Any]:
        """K traces per question from q_φ; each split at the answer marker's tokens."""
        questions = self.sampled_questions()
        prompts = [encode(self.tokenizer, self.posterior_prompt(row)) for row in questions]
        model, tokenizer = self._load(self.posterior_path())
        engine = self.make_engine(self.posterior_path(), model, tokenizer)
        sampling = Sampling(
            temperature=self.config.trace_temperature, max_tokens=self.trace_max_tokens, seed=self.seed
        )
        try:
            groups = engine.generate(prompts, sampling, n=self.config.num_traces)
        finally:
            engine.close()
        marker = encode(self.tokenizer, self.template.answer_prefix)
        eos = self.tokenizer.eos_token_id
        rows = []
        for q, group in enumerate(groups):
            for k, rollout in enumerate(group):
                ids = list(rollout.completion_ids)
                if ids and ids[-1] == eos:
                    ids = ids[:-1]
                cut = find_last(ids, marker) if self.template.answer_suffix() == "" else len(ids)
                valid = not rollout.truncated and cut > 0
                trace_ids = ids[:cut] if cut > 0 else ids
                rows.append(
                    {
                        "question_index": q,
                        "k": k,
                        "trace_ids": trace_ids,
                        "trace": self.tokenizer.decode(trace_ids),
                        "completion": rollout.text,
                        "valid": valid,
                        "finish_reason": rollout.finish_reason,
                    }
                )
        samples = Dataset.from_list(rows)
        samples.save_to_disk(self.stage_dir("samples") / "data")
        return {"questions": len(questions), "traces": len(rows), "valid": int(sum(r["valid"] for r in rows))}

    def stage_scores(self) -> dict[str, Any]:
        """log π_θ0(z|x), log q_φ(z|x,y′) and the reference answer's token log-probs under π_θ0."""
        questions = self.sampled_questions()
        samples = load_from_disk(str(self.stage_dir("samples") / "data"))
        pad = self.tokenizer.pad_token_id or 0
        prior_seqs, prior_starts, answer_starts, post_seqs, post_starts = [], [], [], [], []
        for sample in samples:
            row = questions[sample["question_index"]]
            prior_prompt = encode(self.tokenizer, self.template.prior_prompt(row["question"], self.tokenizer))
            ids = scoring_ids(
                self.template, self.tokenizer, prior_prompt, sample["trace_ids"], str(row["answer"])
            )
            prior_seqs.append(ids.ids)
            prior_starts.append(ids.trace_start)
            answer_starts.append(ids.answer_start)
            post_prompt = encode(self.tokenizer, self.posterior_prompt(row))
            trace_and_marker = ids.ids[ids.trace_start : ids.answer_start]
            post_seqs.append(post_prompt + trace_and_marker)
            post_starts.append(len(post_prompt))
        size = self.config.scoring_batch_size
        prior, _ = self._load(self.prior_path())
        prior_logps = span_token_logprobs(prior, prior_seqs, prior_starts, pad_id=pad, batch_size=size)
        del prior
        posterior, _ = self._load(self.posterior_path())
        post_logps = span_token_logprobs(posterior, post_seqs, post_starts, pad_id=pad, batch_size=size)
        del posterior
        columns: dict[str, list] = {"trace_logp_prior": [], "trace_logp_posterior": [], "trace_length": []}
        columns["answer_token_logps"] = []
        for logp, post, trace_start, answer_start in zip(
            prior_logps, post_logps, prior_starts, answer_starts
        ):
            trace_len = answer_start - trace_start
            columns["trace_logp_prior"].append(float(logp[:trace_len].sum()))
            columns["trace_logp_posterior"].append(float(post.sum()))
            columns["trace_length"].append(trace_len)
            columns["answer_token_logps"].append(logp[trace_len:].tolist())
        scored = samples
        for name, values in columns.items():
            scored = scored.add_column(name, values)
        scored.save_to_disk(self.stage_dir("scores") / "data")
        return {"traces": len(scored)}

    def stage_accuracy(self) -> dict[str, Any]:
        """Acc: `answer_samples` answers from π_θ0 after each trace, graded against the question."""
        questions = self.sampled_questions()
        scored = load_from_disk(str(self.stage_dir("scores") / "data"))
        correct = [0] * len(scored)
        if self.config.answer_samples > 0:
            marker = encode(self.tokenizer, self.template.answer_prefix)
            prompts = [
                encode(
                    self.tokenizer,
                    self.template.prior_prompt(questions[s["question_index"]]["question"], self.tokenizer),
                )
                + s["trace_ids"]
                + marker
                for s in scored
            ]
            model, tokenizer = self._load(self.prior_path())
            engine = self.make_engine(self.prior_path(), model, tokenizer)
            sampling = Sampling(
                temperature=self.config.answer_temperature,
                max_tokens=self.config.answer_max_tokens,
                seed=self.seed + 1,
            )
            try:
                groups = engine.generate(prompts, sampling, n=self.config.answer_samples)
            finally:
                engine.close()
            for i, (sample, group) in enumerate(zip(scored, groups)):
                record = questions[sample["question_index"]]
                correct[i] = sum(
                    is_correct(sample["trace"] + self.template.answer_prefix + r.text, record) for r in group
                )
        with_acc = scored.add_column("answers_correct", correct)
        with_acc.save_to_disk(self.stage_dir("accuracy") / "data")
        n = max(self.config.answer_samples, 1)
        return {"mean_accuracy": sum(correct) / (n * max(len(correct), 1))}

    def stage_weights(self) -> dict[str, Any]:
        """Eq. 8 weights, filters, per-question normalisation, fallback; the final SFT dataset."""
        questions = self.sampled_questions()
        data = load_from_disk(str(self.stage_dir("accuracy") / "data"))
        k = self.config.num_traces
        by_question: dict[int, list[dict[str, Any]]] = {}
        for row in data:
            by_question.setdefault(row["question_index"], []).append(row)
        n_answers = max(self.config.answer_samples, 1)
        final_rows, iwae_rows, ess, fallbacks = [], [], [], 0
        keep_columns = [c for c in questions.column_names if c not in ("solution",)]
        for q, rows in sorted(by_question.items()):
            rows = sorted(rows, key=lambda r: r["k"])
            prior = torch.tensor([r["trace_logp_prior"] for r in rows], dtype=torch.float64)
            post = torch.tensor([r["trace_logp_posterior"] for r in rows], dtype=torch.float64)
            lengths = torch.tensor([max(r["trace_length"], 1) for r in rows])
            width = max(len(r["answer_token_logps"]) for r in rows)
            answer = torch.zeros(len(rows), width, dtype=torch.float64)
            mask = torch.zeros(len(rows), width, dtype=torch.bool)
            for i, r in enumerate(rows):
                answer[i, : len(r["answer_token_logps"])] = torch.tensor(r["answer_token_logps"])
                mask[i, : len(r["answer_token_logps"])] = True
            log_l = log_likelihood_estimator(answer, mask)
            estimates = {
                "acc": log_acc_estimator(
                    [r["answers_correct"] for r in rows], n_answers, dtype=torch.float64
                ),
                "gml": log_gml_estimator(answer, mask),
                "l": log_l,
            }
            log_w = practical_log_weights(prior, post, lengths, estimates[self.config.estimator])
            valid = torch.tensor([r["valid"] for r in rows])
            log_w = torch.where(valid, log_w, torch.full_like(log_w, -math.inf))
            weights = normalized_weights(log_w)
            iwae_rows.append(prior + log_l - post)
            record = {c: questions[q][c] for c in keep_columns}
            if weights.sum() == 0:
                fallbacks += 1
                final_rows.append({**record, "solution": questions[q]["solution"], "weight": 1.0})
                continue
            ess.append(float(1.0 / (weights**2).sum()))
            if self.config.final_data == "argmax":
                best = int(weights.argmax())
                final_rows.append({**record, "solution": rows[best]["trace"], "weight": 1.0})
            else:
                for r, w in zip(rows, weights.tolist()):
                    if w > 0:
                        final_rows.append({**record, "solution": r["trace"], "weight": w * len(rows)})
        final = Dataset.from_list(final_rows)
        if self.config.final_data == "argmax":
            original = self.records.add_column("weight", [1.0] * len(self.records))
            final = concatenate_datasets([final, original.select_columns(final.column_names)])
        final.save_to_disk(self.stage_dir("weights") / "data")
        stats = {
            "questions": len(by_question),
            "fallback_questions": fallbacks,
            "final_samples": len(final),
            "mean_ess": sum(ess) / max(len(ess), 1),
            "iwae_bound": iwae_curve(iwae_rows, k),
        }
        (self.stage_dir("weights") / "stats.json").write_text(json.dumps(stats, indent=2))
        return stats

    def stage_heldout_bound(self) -> dict[str, Any]:
        """IWAE bounds L^{K'} (K' = 1, 2, 4, …, K) of log π_θ0(Y|x) on held-out questions, traces from q_φ."""
        from reasoning.data.datasets import load_records

        records = load_records(self.config.heldout, limit=self.config.heldout_questions)
        config = dataclasses.replace(
            self.config,
            prior_path=self.prior_path(),
            posterior_path=self.posterior_path(),
            num_questions=None,
            answer_samples=0,
            estimator="l",
            heldout=None,
        )
        child = VariationalReasoningPipeline(
            config,
            self.base_path,
            records,
            {**self.training, "output_dir": str(self.stage_dir("heldout_bound"))},
            self.make_engine,
            self.trace_max_tokens,
            self.console,
        )
        child.tokenizer = self.tokenizer
        child._stage("samples", child.stage_samples)
        child._stage("scores", child.stage_scores)
        scored = load_from_disk(str(child.stage_dir("scores") / "data"))
        rows: dict[int, list[tuple[int, float]]] = {}
        for r in scored:
            log_l = sum(r["answer_token_logps"])
            rows.setdefault(r["question_index"], []).append(
                (r["k"], r["trace_logp_prior"] + log_l - r["trace_logp_posterior"])
            )
        log_w = [torch.tensor([v for _, v in sorted(row)], dtype=torch.float64) for row in rows.values()]
        curve = iwae_curve(log_w, self.config.num_traces)
        (self.stage_dir("heldout_bound") / "bound.json").write_text(json.dumps(curve, indent=2))
        return {"questions": len(log_w), "iwae_bound": curve}

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        """Run (or resume) every stage; returns each stage's info. The final model is `<run_dir>/final`."""
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.base_path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        info: dict[str, Any] = {}
        steps = {
            "prior": self.config.prior_steps,
            "posterior": self.config.posterior_steps,
            "final": self.config.final_steps,
        }
        if self.config.prior_path is None:
            info["prior"] = self._stage(
                "prior", lambda: self._sft("prior", self.base_path, self.records, steps["prior"], False)
            )
        if self.config.posterior_path is None and not self.config.no_hint:
            info["posterior"] = self._stage(
                "posterior",
                lambda: self._sft("posterior", self.base_path, self.records, steps["posterior"], True),
            )
        info["samples"] = self._stage("samples", self.stage_samples)
        info["scores"] = self._stage("scores", self.stage_scores)
        info["accuracy"] = self._stage("accuracy", self.stage_accuracy)
        info["weights"] = self._stage("weights", self.stage_weights)
        init = self.base_path if self.config.final_init == "base" else self.prior_path()
        info["final"] = self._stage(
            "final_sft",
            lambda: self._sft(
                "final_sft",
                init,
                load_from_disk(str(self.stage_dir("weights") / "data")),
                steps["final"],
                False,
            ),
        )
        if self.config.heldout:
            info["heldout_bound"] = self._stage("heldout_bound", self.stage_heldout_bound)
        final = Path(info["final"]["path"])
        target = self.run_dir / "final"
        if not (target / "config.json").exists():
            model, tokenizer = self._load(str(final))
            model.save_pretrained(target)
            tokenizer.save_pretrained(target)
        (self.run_dir / "pipeline.json").write_text(
            json.dumps({"config": dataclasses.asdict(self.config), "stages": info}, indent=2, default=str)
        )
        return info


def iwae_curve(log_w_rows: list[torch.Tensor], k: int) -> dict[str, float]:
    """Mean IWAE bound L^{K'} over questions for K' = 1, 2, 4, …, ≤ K.

    `log_w_rows[q][k]` = log π(z_k|x) + log π(Y|x, z_k) − log q(z_k|x, y′) for K traces z_k ~ q. Each
    question's K traces are cut into K/K' disjoint blocks and the block bounds averaged: an unbiased
    estimate of E[L^{K'}] that uses every trace.
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
