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

One process. The sampling, scoring and weighting stages are not sharded and every stage writes its
folder without a rank guard, so the pipeline refuses a multi-process launch and DeepSpeed
(`single_process_problem`): launch it with `reasoning train` or `accelerate launch --config_file
recipes/accelerate/single_gpu.yaml`. To train its SFT stages on many GPUs, run them as `trainer:
sft` recipes and pass their models as `prior_path` / `posterior_path`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, concatenate_datasets, load_from_disk
from rich.console import Console
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase, TrainingArguments

from reasoning.data.templates import Template, encode, find_last, scoring_ids, template_for
from reasoning.models.scoring import span_token_logprobs
from reasoning.objectives.variational import (
    forward_kl_posterior_weights,
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


def single_process_problem(training: Mapping[str, Any], env: Mapping[str, str] | None = None) -> str | None:
    """Why this launch cannot run the pipeline (None when it can): it must be one process, without DeepSpeed.

    Several processes (WORLD_SIZE > 1, set by torchrun and `accelerate launch`) would each run the
    unsharded stages whole and write the same stage folders. DeepSpeed (`training.deepspeed`, or
    `accelerate launch` with a DeepSpeed config: ACCELERATE_USE_DEEPSPEED) would make the stages'
    own `from_pretrained` loads ZeRO-3 partitioned while a DeepSpeed TrainingArguments is alive
    (transformers' `is_deepspeed_zero3_enabled`), which scoring and sampling cannot use.
    """
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = max(world, torch.distributed.get_world_size())
    fix = (
        "launch it as one process: `reasoning train RECIPE.yaml` or `accelerate launch --config_file "
        "recipes/accelerate/single_gpu.yaml -m reasoning train RECIPE.yaml`. To train its SFT stages on several "
        "GPUs, run them as `trainer: sft` recipes and pass the models as variational.prior_path / posterior_path"
    )
    if world > 1:
        return (
            f"the variational pipeline runs in one process, and this launch starts {world} (WORLD_SIZE): its "
            "sampling, scoring and weighting stages are not sharded, so every process would run them whole and "
            f"write the same stage folders; {fix}"
        )
    if training.get("deepspeed") or env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("true", "1", "yes"):
        source = "training.deepspeed" if training.get("deepspeed") else "the accelerate config (ACCELERATE_USE_DEEPSPEED)"
        return (
            f"the variational pipeline does not run under DeepSpeed ({source}): its stages load models with "
            f"from_pretrained, which DeepSpeed ZeRO-3 would load partitioned; {fix} (and no training.deepspeed)"
        )
    return None
FINAL_DATA = ("weighted", "argmax")
POSTERIOR_TRAINING = ("sft", "forward_kl", "reverse_kl")


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
    posterior_training: str = field(
        default="sft",
        metadata={
            "help": "How q_φ is trained: sft (hint template on the data's traces, the released pipeline), "
            "forward_kl (Eq. 9: π_θ0's own traces weighted by π̂(Y|x,z)), reverse_kl (score-function "
            "steps on q's traces with reward log π_θ0(z,Y|x) − log q; for comparison)"
        },
    )
    posterior_init: str | None = field(
        default=None,
        metadata={
            "help": "Checkpoint the forward/reverse-KL posterior starts from (default: base, or hint SFT)."
        },
    )
    rounds: int = field(
        default=1,
        metadata={
            "help": "Rounds T of Algorithm 1: round t ≥ 2 uses round t−1's model as π and Eq. 9 for q."
        },
    )
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
        if self.posterior_training not in POSTERIOR_TRAINING:
            raise ValueError(
                f"posterior_training must be one of {POSTERIOR_TRAINING}, got {self.posterior_training!r}"
            )
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.estimator == "acc" and self.answer_samples < 1:
            raise ValueError("estimator 'acc' needs answer_samples >= 1 (answers sampled after each trace)")


class VariationalReasoningPipeline:
    """Stages 1–7 of the released variational-reasoning pipeline, resumable stage by stage.

    Args:
        config: the `variational:` section.
        base_path: the base model (checkpoint directory or hub name) every SFT stage starts from.
        records: training records with `question`, `answer`, `solution` (and `task` for synthetic).
        training: TrainingArguments fields shared by the SFT stages (`output_dir` is the run dir).
        make_engine: `(model_path, model, tokenizer) -> RolloutEngine` for sampling.
        trace_max_tokens: token budget of a sampled trace (the rollout section's `max_tokens`).
        dtype: torch dtype name the stages load models in (the model section's `dtype`).
        lora: `peft.LoraConfig` fields (the model section's `lora`): the SFT stages then train LoRA
            adapters and save the merged model (plus `adapter/`), which later stages load as usual.
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
        dtype: str = "float32",
        lora: dict[str, Any] | None = None,
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
        self.dtype = getattr(torch, dtype)
        self.lora = lora

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

        model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
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
        if self.lora is not None:
            from reasoning.models.lora import apply_lora

            model = apply_lora(model, self.lora)
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
        from reasoning.models.lora import save_trained_policy

        save_trained_policy(trainer, out / "final")  # a LoRA policy: the merged model, and adapter/
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
        answers: list[str | None] = [None] * len(scored)
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
                texts = [sample["trace"] + self.template.answer_prefix + r.text for r in group]
                graded = [is_correct(text, record) for text in texts]
                correct[i] = sum(graded)
                if any(graded):
                    answers[i] = self.template.split_completion(texts[graded.index(True)])[1]
        # The final SFT pairs each trace with a correct answer sampled after it (as the released code
        # does): with many valid answers (countdown) the reference answer may not be the trace's.
        with_acc = scored.add_column("answers_correct", correct).add_column("sampled_answer", answers)
        with_acc.save_to_disk(self.stage_dir("accuracy") / "data")
        n = max(self.config.answer_samples, 1)
        return {"mean_accuracy": sum(correct) / (n * max(len(correct), 1))}

    def stage_weights(self) -> dict[str, Any]:
        """Eq. 8 weights, filters, per-question normalisation, fallback; the final SFT dataset."""
        questions = self.sampled_questions()
        k = self.config.num_traces
        final_rows, iwae_rows, ess, fallbacks = [], [], [], 0
        keep_columns = [c for c in questions.column_names if c not in ("solution",)]
        groups = self.grouped_scores(self.stage_dir("accuracy"))
        for q, rows, g in groups:
            prior, post, log_l = g["trace_logp_prior"], g["trace_logp_posterior"], g["l"]
            log_w = practical_log_weights(prior, post, g["trace_length"], g[self.config.estimator])
            log_w = torch.where(g["valid"], log_w, torch.full_like(log_w, -math.inf))
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
                final_rows.append({**record, **trace_and_answer(rows[best]), "weight": 1.0})
            else:
                for r, w in zip(rows, weights.tolist()):
                    if w > 0:
                        final_rows.append({**record, **trace_and_answer(r), "weight": w * len(rows)})
        final = Dataset.from_list(final_rows)
        if self.config.final_data == "argmax":
            original = self.records.add_column("weight", [1.0] * len(self.records))
            final = concatenate_datasets([final, original.select_columns(final.column_names)])
        final.save_to_disk(self.stage_dir("weights") / "data")
        stats = {
            "questions": len(groups),
            "fallback_questions": fallbacks,
            "final_samples": len(final),
            "mean_ess": sum(ess) / max(len(ess), 1),
            "iwae_bound": iwae_curve(iwae_rows, k),
        }
        (self.stage_dir("weights") / "stats.json").write_text(json.dumps(stats, indent=2))
        plot_bound(stats["iwae_bound"], self.stage_dir("weights") / "iwae_bound.png", "training questions")
        return stats

    def grouped_scores(self, stage: Path) -> list[tuple[int, list[dict[str, Any]], dict[str, torch.Tensor]]]:
        """Per question (index, its traces by k, float64 tensors over the traces): sequence log-probs,
        lengths, validity and the three log-estimators of π(Y|x, z) (acc, gml, l)."""
        data = load_from_disk(str(stage / "data"))
        by_question: dict[int, list[dict[str, Any]]] = {}
        for row in data:
            by_question.setdefault(row["question_index"], []).append(row)
        n_answers = max(self.config.answer_samples, 1)
        out = []
        for q, rows in sorted(by_question.items()):
            rows = sorted(rows, key=lambda r: r["k"])
            width = max(len(r["answer_token_logps"]) for r in rows)
            answer = torch.zeros(len(rows), width, dtype=torch.float64)
            mask = torch.zeros(len(rows), width, dtype=torch.bool)
            for i, r in enumerate(rows):
                answer[i, : len(r["answer_token_logps"])] = torch.tensor(r["answer_token_logps"])
                mask[i, : len(r["answer_token_logps"])] = True
            tensors = {
                name: torch.tensor([r[name] for r in rows], dtype=torch.float64)
                for name in ("trace_logp_prior", "trace_logp_posterior")
            }
            tensors["trace_length"] = torch.tensor([max(r["trace_length"], 1) for r in rows])
            tensors["valid"] = torch.tensor([r["valid"] for r in rows])
            tensors["acc"] = log_acc_estimator(
                [r.get("answers_correct", 0) for r in rows], n_answers, dtype=torch.float64
            )
            tensors["gml"] = log_gml_estimator(answer, mask)
            tensors["l"] = log_likelihood_estimator(answer, mask)
            out.append((q, rows, tensors))
        return out

    def child(
        self, run_dir: Path, records: Dataset | None = None, **changes: Any
    ) -> VariationalReasoningPipeline:
        """A pipeline over the same (or other) data with some config fields changed, in `run_dir`."""
        child = VariationalReasoningPipeline(
            dataclasses.replace(self.config, **changes),
            self.base_path,
            self.records if records is None else records,
            {**self.training, "output_dir": str(run_dir)},
            self.make_engine,
            self.trace_max_tokens,
            self.console,
            str(self.dtype).removeprefix("torch."),
            self.lora,
        )
        child.tokenizer = self.tokenizer
        return child

    def _sample_score_and_grade(self, pipeline: VariationalReasoningPipeline) -> None:
        pipeline._stage("samples", pipeline.stage_samples)
        pipeline._stage("scores", pipeline.stage_scores)
        pipeline._stage("accuracy", pipeline.stage_accuracy)

    def stage_forward_kl_posterior(self) -> dict[str, Any]:
        """Eq. 9: min_φ KL(P_θ0(z|x, Y) ‖ q_φ) ≈ weighted SFT of q on M traces z_m ~ π_θ0(z|x),
        w̃_m = π̂(Y|x, z_m) / Σ_j π̂(Y|x, z_j) (the configured estimator), posterior template."""
        data_dir = self.stage_dir("posterior") / "prior_traces"
        sampler = self.child(
            data_dir, no_hint=True, prior_path=self.prior_path(), posterior_path=None, heldout=None, rounds=1
        )
        self._sample_score_and_grade(sampler)
        rows_out = []
        keep = [c for c in self.records.column_names if c != "solution"]
        questions = self.sampled_questions()
        for q, rows, g in sampler.grouped_scores(sampler.stage_dir("accuracy")):
            log_y = torch.where(g["valid"], g[self.config.estimator], torch.full_like(g["l"], -math.inf))
            weights = forward_kl_posterior_weights(log_y)
            for r, w in zip(rows, weights.tolist()):
                if w > 0:
                    record = {c: questions[q][c] for c in keep}
                    rows_out.append({**record, "solution": r["trace"], "weight": w * len(rows)})
        if not rows_out:
            raise RuntimeError(
                "forward-KL posterior: no prior trace reached a correct answer; train the prior longer "
                "or use posterior_training: sft"
            )
        data = Dataset.from_list(rows_out)
        data.save_to_disk(self.stage_dir("posterior") / "data")
        init = self.config.posterior_init or self.base_path
        info = self._sft("posterior", init, data, self.config.posterior_steps, True)
        return {**info, "weighted_traces": len(rows_out)}

    def stage_reverse_kl_posterior(self) -> dict[str, Any]:
        """Reverse KL, for comparison: ∇_φ KL(q ‖ P(z|x, Y)) = −E_q[(log π_θ0(z, Y|x) − log q(z) − b) ∇ log q],
        estimated on K traces from the current q with a per-question mean baseline b, applied as
        signed-weight SFT of q (`posterior_steps` steps on that batch, so only the first is on-policy)."""
        data_dir = self.stage_dir("posterior") / "posterior_traces"
        sampler = self.child(
            data_dir, posterior_path=self.config.posterior_init, prior_path=self.prior_path(), heldout=None
        )
        sampler._stage("samples", sampler.stage_samples)
        sampler._stage("scores", sampler.stage_scores)
        rows_out = []
        keep = [c for c in self.records.column_names if c != "solution"]
        questions = self.sampled_questions()
        for q, rows, g in sampler.grouped_scores(sampler.stage_dir("scores")):
            reward = g["trace_logp_prior"] + g["l"] - g["trace_logp_posterior"]
            advantage = reward - reward.mean()
            for r, a in zip(rows, advantage.tolist()):
                record = {c: questions[q][c] for c in keep}
                rows_out.append({**record, "solution": r["trace"], "weight": a})
        data = Dataset.from_list(rows_out)
        data.save_to_disk(self.stage_dir("posterior") / "data")
        info = self._sft("posterior", self.config.posterior_init, data, self.config.posterior_steps, True)
        return {**info, "traces": len(rows_out)}

    def stage_heldout_bound(self) -> dict[str, Any]:
        """IWAE bounds L^{K'} (K' = 1, 2, 4, …, K) of log π_θ0(Y|x) on held-out questions, traces from q_φ."""
        from reasoning.data.datasets import load_records

        child = self.child(
            self.stage_dir("heldout_bound"),
            records=load_records(self.config.heldout, limit=self.config.heldout_questions),
            prior_path=self.prior_path(),
            posterior_path=self.posterior_path(),
            num_questions=None,
            answer_samples=0,
            estimator="l",
            heldout=None,
        )
        child._stage("samples", child.stage_samples)
        child._stage("scores", child.stage_scores)
        log_w = [
            g["trace_logp_prior"] + g["l"] - g["trace_logp_posterior"]
            for _, _, g in child.grouped_scores(child.stage_dir("scores"))
        ]
        curve = iwae_curve(log_w, self.config.num_traces)
        (self.stage_dir("heldout_bound") / "bound.json").write_text(json.dumps(curve, indent=2))
        plot_bound(curve, self.stage_dir("heldout_bound") / "iwae_bound.png", "held-out questions")
        return {"questions": len(log_w), "iwae_bound": curve}

    # ------------------------------------------------------------------ run
    def _posterior_stage(self) -> dict[str, Any] | None:
        if self.config.no_hint or (self.config.posterior_path and self.config.posterior_training == "sft"):
            return None
        if self.config.posterior_training == "forward_kl":
            return self._stage("posterior", self.stage_forward_kl_posterior)
        if self.config.posterior_training == "reverse_kl":
            if self.config.posterior_init is None:  # start from the hint-SFT posterior
                hint = self.child(self.stage_dir("posterior_sft"), posterior_training="sft", rounds=1)
                hint._stage(
                    "posterior",
                    lambda: hint._sft(
                        "posterior", self.base_path, self.records, self.config.posterior_steps, True
                    ),
                )
                self.config = dataclasses.replace(
                    self.config, posterior_init=str(hint.stage_dir("posterior") / "final")
                )
            return self._stage("posterior", self.stage_reverse_kl_posterior)
        return self._stage(
            "posterior",
            lambda: self._sft("posterior", self.base_path, self.records, self.config.posterior_steps, True),
        )

    def run(self) -> dict[str, Any]:
        """Run (or resume) every stage of every round; the final model is `<run_dir>/final`.

        Round 1 is the released pipeline (stages 1–7). Round t ≥ 2 (Algorithm 1, `rounds`) runs in
        `<run_dir>/round<t>/`: π ← round t−1's final model, q ← Eq. 9 forward-KL training on π's own
        traces (starting from round t−1's posterior), then stages 3–7 again.
        """
        from transformers import AutoTokenizer

        problem = single_process_problem(self.training)
        if problem is not None:  # before any stage folder is written
            raise RuntimeError(problem)
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        info: dict[str, Any] = {}
        if self.config.prior_path is None:
            info["prior"] = self._stage(
                "prior",
                lambda: self._sft("prior", self.base_path, self.records, self.config.prior_steps, False),
            )
        posterior = self._posterior_stage()
        if posterior is not None:
            info["posterior"] = posterior
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
                self.config.final_steps,
                False,
            ),
        )
        if self.config.heldout:
            info["heldout_bound"] = self._stage("heldout_bound", self.stage_heldout_bound)
        final = Path(info["final"]["path"])
        previous = self
        for round_index in range(2, self.config.rounds + 1):
            nxt = previous.child(
                self.run_dir / f"round{round_index}",
                prior_path=str(final),
                posterior_path=None,
                posterior_training="forward_kl",
                posterior_init=previous.posterior_path(),
                rounds=1,
            )
            info[f"round{round_index}"] = nxt.run()
            final, previous = Path(info[f"round{round_index}"]["final"]["path"]), nxt
        target = self.run_dir / "final"
        if not (target / "config.json").exists():
            # written beside and renamed: `reasoning train` takes final/config.json as "finished"
            partial = self.run_dir / "final.partial"
            model, tokenizer = self._load(str(final))
            model.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
            if target.exists():
                shutil.rmtree(target)
            os.replace(partial, target)
        (self.run_dir / "pipeline.json").write_text(
            json.dumps({"config": dataclasses.asdict(self.config), "stages": info}, indent=2, default=str)
        )
        return info


def trace_and_answer(row: dict[str, Any]) -> dict[str, str]:
    """SFT target of a weighted trace: the trace, and a correct answer sampled after it when Acc found one."""
    answer = row.get("sampled_answer")
    return {"solution": row["trace"], **({"answer": answer} if answer else {})}


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


def plot_bound(curve: dict[str, float], path: Path, title: str) -> None:
    """Save the IWAE bound against K as a PNG (log-2 axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [int(k) for k in curve]
    figure, axis = plt.subplots(figsize=(4, 3))
    axis.plot(sizes, [curve[str(k)] for k in sizes], marker="o")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("K (traces per question)")
    axis.set_ylabel("IWAE bound on log π(Y|x) (nats)")
    axis.set_title(f"IWAE bound vs K, {title}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
