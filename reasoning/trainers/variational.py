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
3. `samples`   K traces per question from q_φ (from π_θ0 with `no_hint`, the paper's ablation), each
               cut before its last answer marker (`templates.TraceCutter`, `at="last"`);
4. `scores`    log π_θ0(z|x), log q_φ(z|x, y′) and the reference answer's token log-probs under
               π_θ0 after the trace and its marker (`templates.answer_layout` with EOS scored,
               `models.scoring.answer_logprobs`);
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, concatenate_datasets, load_from_disk
from rich.console import Console
from transformers import PreTrainedTokenizerBase

from reasoning.data.datasets import load_records
from reasoning.data.templates import Template, TraceCutter, answer_layout, encode, template_for
from reasoning.models.scoring import answer_logprobs, span_token_logprobs
from reasoning.objectives.variational import (
    effective_sample_size,
    forward_kl_posterior_weights,
    iwae_curve,
    practical_weights,
)
from reasoning.rewards.verifier import is_correct
from reasoning.rollout import Sampling
from reasoning.trainers.sft import SFTConfig
from reasoning.trainers.variational_config import ESTIMATORS, VariationalConfig, single_process_problem
from reasoning.trainers.variational_stages import (
    StagedRun,
    check_records,
    grouped_scores,
    load_causal_lm,
    load_tokenizer,
    plot_bound,
    publish_model,
    sft_stage,
    trace_and_answer,
    trace_row,
    without_solution,
)

# the config and the launch rule (variational_config.py) re-exported for the recipe table and the online trainer
__all__ = ["ESTIMATORS", "VariationalConfig", "VariationalReasoningPipeline", "single_process_problem"]


class VariationalReasoningPipeline(StagedRun):
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
        check_records(records, config.hint_column)
        self.training = dict(training)
        super().__init__(Path(self.training["output_dir"]), console or Console(stderr=True))
        self.config = config
        self.base_path = base_path
        self.records = records
        self.make_engine = make_engine
        self.trace_max_tokens = trace_max_tokens
        self.seed = int(self.training.get("seed", 0))
        self.dtype = getattr(torch, dtype)
        self.lora = lora

    # ------------------------------------------------------------------ helpers
    @property
    def template(self) -> Template:
        return template_for(self.tokenizer)

    def _sft(self, name: str, init: str, records: Dataset, max_steps: int | None, posterior: bool) -> dict:
        sft = SFTConfig(
            max_length=self.config.max_length,
            dr_sft=self.config.dr_sft,
            posterior=posterior,
            hint_after=self.config.hint_after,
            hint_column=self.config.hint_column,
        )
        return sft_stage(
            self.stage_dir(name), init, records, self.training, sft,
            max_steps=max_steps, dtype=self.dtype, lora=self.lora,
        )  # fmt: skip

    def prior_path(self) -> str:
        return self.config.prior_path or str(self.stage_dir("prior") / "final")

    def posterior_path(self) -> str:
        if self.config.no_hint:
            return self.prior_path()
        return self.config.posterior_path or str(self.stage_dir("posterior") / "final")

    def traced_records(self) -> Dataset:
        """The records with a reference trace: what the SFT stages (π_θ0, the hinted q_φ, argmax's
        original data) train on. Under answers-only supervision (most records have only a question and
        its answer, `solution` "") the others are reached only through sampled traces."""
        traced = self.records.filter(lambda row: bool(str(row["solution"]).strip()))
        if len(traced) == 0:
            raise ValueError(
                "no training record has a reference trace (every `solution` is empty): the prior and the "
                "posterior need some traced questions; give prior_path/posterior_path or add traces"
            )
        return traced

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

    def prior_prompt_ids(self, row: dict[str, Any]) -> list[int]:
        return encode(self.tokenizer, self.template.prior_prompt(row["question"], self.tokenizer))

    def sample(self, model_path: str, prompts: list[list[int]], sampling: Sampling, n: int) -> list:
        """`n` completions of each prompt from the checkpoint `model_path` (an engine of its own, closed)."""
        model, tokenizer = load_causal_lm(model_path, self.dtype)
        engine = self.make_engine(model_path, model, tokenizer)
        try:
            return engine.generate(prompts, sampling, n=n)
        finally:
            engine.close()

    def marker(self, sample: dict[str, Any]) -> str:
        """The answer marker that follows a sampled trace: the completion's own (`TraceCut.marker`), else
        the template's `answer_prefix` (a trace without one, or samples written before the column)."""
        return sample.get("marker") or self.template.answer_prefix

    # ------------------------------------------------------------------ stages
    def stage_samples(self) -> dict[str, Any]:
        """K traces per question from q_φ; each cut before its last answer marker."""
        questions = self.sampled_questions()
        prompts = [encode(self.tokenizer, self.posterior_prompt(row)) for row in questions]
        sampling = Sampling(
            temperature=self.config.trace_temperature, max_tokens=self.trace_max_tokens, seed=self.seed
        )
        groups = self.sample(self.posterior_path(), prompts, sampling, self.config.num_traces)
        # the last marker: the answer a reader takes (the weights are not differentiated through the cut)
        cutter = TraceCutter(self.template, self.tokenizer, at="last")
        rows = [
            {"question_index": q, "k": k, **trace_row(rollout, cutter)}
            for q, group in enumerate(groups)
            for k, rollout in enumerate(group)
        ]
        samples = Dataset.from_list(rows)
        samples.save_to_disk(self.stage_dir("samples") / "data")
        return {"questions": len(questions), "traces": len(rows), "valid": int(sum(r["valid"] for r in rows))}

    def stage_scores(self) -> dict[str, Any]:
        """log π_θ0(z|x), log q_φ(z|x,y′) (z with its marker) and the reference answer's token log-probs
        (then EOS) under π_θ0 after z."""
        questions = self.sampled_questions()
        samples = load_from_disk(str(self.stage_dir("samples") / "data"))
        pad = self.tokenizer.pad_token_id or 0
        layouts, post_seqs, post_starts = [], [], []
        for sample in samples:
            row = questions[sample["question_index"]]
            layout = answer_layout(
                self.template, self.tokenizer, self.prior_prompt_ids(row), sample["trace_ids"], str(row["answer"]),
                score_eos=True, marker=self.marker(sample),
            )  # fmt: skip
            layouts.append(layout)
            post_prompt = encode(self.tokenizer, self.posterior_prompt(row))
            post_seqs.append(post_prompt + layout.ids[layout.trace_start : layout.answer_start])
            post_starts.append(len(post_prompt))
        size = self.config.scoring_batch_size
        prior, _ = load_causal_lm(self.prior_path(), self.dtype)
        under_prior = answer_logprobs(prior, layouts, pad_id=pad, batch_size=size, with_trace=True)
        del prior
        posterior, _ = load_causal_lm(self.posterior_path(), self.dtype)
        post_logps = span_token_logprobs(posterior, post_seqs, post_starts, pad_id=pad, batch_size=size)
        del posterior
        columns = {
            "trace_logp_prior": under_prior.trace.tolist(),
            "trace_logp_posterior": [float(post.sum()) for post in post_logps],
            "trace_length": under_prior.trace_length.tolist(),
            "answer_token_logps": [
                answer[mask].tolist() for answer, mask in zip(under_prior.answer, under_prior.answer_mask)
            ],
        }
        scored = samples
        for name, values in columns.items():
            scored = scored.add_column(name, values)
        scored.save_to_disk(self.stage_dir("scores") / "data")
        return {"traces": len(scored)}

    def stage_accuracy(self) -> dict[str, Any]:
        """Acc: `answer_samples` answers from π_θ0 after each trace and its marker, graded against the question."""
        questions = self.sampled_questions()
        scored = load_from_disk(str(self.stage_dir("scores") / "data"))
        correct = [0] * len(scored)
        answers: list[str | None] = [None] * len(scored)
        if self.config.answer_samples > 0:
            prompts = [
                self.prior_prompt_ids(questions[s["question_index"]])
                + s["trace_ids"]
                + encode(self.tokenizer, self.marker(s))
                for s in scored
            ]
            sampling = Sampling(
                temperature=self.config.answer_temperature,
                max_tokens=self.config.answer_max_tokens,
                seed=self.seed + 1,
            )
            groups = self.sample(self.prior_path(), prompts, sampling, self.config.answer_samples)
            for i, (sample, group) in enumerate(zip(scored, groups)):
                record = questions[sample["question_index"]]
                texts = [sample["trace"] + self.marker(sample) + r.text for r in group]
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
        final_rows, iwae_rows, ess, fallbacks, untraced_dropped = [], [], [], 0, 0
        groups = grouped_scores(self.stage_dir("accuracy"), self.config.answer_samples)
        for q, rows, g in groups:
            prior, post = g["trace_logp_prior"], g["trace_logp_posterior"]
            weights = practical_weights(prior, post, g["trace_length"], g[self.config.estimator], g["valid"])
            iwae_rows.append(prior + g["l"] - post)
            record = without_solution(questions[q])
            if weights.sum() == 0:
                if not str(questions[q]["solution"]).strip():  # answers only: nothing to fall back on
                    untraced_dropped += 1
                    continue
                fallbacks += 1
                final_rows.append({**record, "solution": questions[q]["solution"], "weight": 1.0})
                continue
            ess.append(float(effective_sample_size(weights)))
            if self.config.final_data == "argmax":
                best = int(weights.argmax())
                final_rows.append({**record, **trace_and_answer(rows[best]), "weight": 1.0})
            else:
                for r, w in zip(rows, weights.tolist()):
                    if w > 0:
                        final_rows.append({**record, **trace_and_answer(r), "weight": w * len(rows)})
        if not final_rows:
            raise ValueError(
                f"the weights stage kept no trace: none of the {len(groups)} sampled questions has a trace of "
                f"positive weight, and {untraced_dropped} have no reference trace to fall back on (answers-only "
                "records); raise num_traces or answer_samples, train the posterior longer, or add traced records"
            )
        final = Dataset.from_list(final_rows)
        if self.config.final_data == "argmax":
            traced = self.traced_records()
            original = traced.add_column("weight", [1.0] * len(traced))
            final = concatenate_datasets([final, original.select_columns(final.column_names)])
        final.save_to_disk(self.stage_dir("weights") / "data")
        stats = {
            "questions": len(groups),
            "fallback_questions": fallbacks,
            "dropped_untraced_questions": untraced_dropped,
            "final_samples": len(final),
            "mean_ess": sum(ess) / max(len(ess), 1),
            "iwae_bound": iwae_curve(iwae_rows, k),
        }
        (self.stage_dir("weights") / "stats.json").write_text(json.dumps(stats, indent=2))
        plot_bound(stats["iwae_bound"], self.stage_dir("weights") / "iwae_bound.png", "training questions")
        return stats

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

    def stage_forward_kl_posterior(self) -> dict[str, Any]:
        """Eq. 9: min_φ KL(P_θ0(z|x, Y) ‖ q_φ) ≈ weighted SFT of q on M traces z_m ~ π_θ0(z|x),
        w̃_m = π̂(Y|x, z_m) / Σ_j π̂(Y|x, z_j) (the configured estimator), posterior template."""
        data_dir = self.stage_dir("posterior") / "prior_traces"
        sampler = self.child(
            data_dir, no_hint=True, prior_path=self.prior_path(), posterior_path=None, heldout=None, rounds=1
        )
        for stage in ("samples", "scores", "accuracy"):
            sampler._stage(stage, getattr(sampler, f"stage_{stage}"))
        rows_out = []
        questions = self.sampled_questions()
        for q, rows, g in grouped_scores(sampler.stage_dir("accuracy"), self.config.answer_samples):
            log_y = torch.where(g["valid"], g[self.config.estimator], torch.full_like(g["l"], -math.inf))
            weights = forward_kl_posterior_weights(log_y)
            record = without_solution(questions[q])
            for r, w in zip(rows, weights.tolist()):
                if w > 0:
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
        questions = self.sampled_questions()
        for q, rows, g in grouped_scores(sampler.stage_dir("scores"), sampler.config.answer_samples):
            reward = g["trace_logp_prior"] + g["l"] - g["trace_logp_posterior"]
            advantage = reward - reward.mean()
            for r, a in zip(rows, advantage.tolist()):
                rows_out.append({**without_solution(questions[q]), "solution": r["trace"], "weight": a})
        data = Dataset.from_list(rows_out)
        data.save_to_disk(self.stage_dir("posterior") / "data")
        info = self._sft("posterior", self.config.posterior_init, data, self.config.posterior_steps, True)
        return {**info, "traces": len(rows_out)}

    def stage_heldout_bound(self) -> dict[str, Any]:
        """IWAE bounds L^{K'} (K' = 1, 2, 4, …, K) of log π_θ0(Y|x) on held-out questions, traces from q_φ."""
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
            for _, _, g in grouped_scores(child.stage_dir("scores"), child.config.answer_samples)
        ]
        curve = iwae_curve(log_w, self.config.num_traces)
        (self.stage_dir("heldout_bound") / "bound.json").write_text(json.dumps(curve, indent=2))
        plot_bound(curve, self.stage_dir("heldout_bound") / "iwae_bound.png", "held-out questions")
        return {"questions": len(log_w), "iwae_bound": curve}

    # ------------------------------------------------------------------ run
    def stage_prior(self) -> dict[str, Any]:
        """π_θ0: SFT of the base on the traced records."""
        return self._sft("prior", self.base_path, self.traced_records(), self.config.prior_steps, False)

    def stage_hint_posterior(self) -> dict[str, Any]:
        """q_φ: SFT of the base with the hint template on the traced records (the released pipeline)."""
        records = self.traced_records()
        return self._sft("posterior", self.base_path, records, self.config.posterior_steps, True)

    def _posterior_stage(self) -> dict[str, Any] | None:
        if self.config.no_hint or (self.config.posterior_path and self.config.posterior_training == "sft"):
            return None
        if self.config.posterior_training == "forward_kl":
            return self._stage("posterior", self.stage_forward_kl_posterior)
        if self.config.posterior_training == "reverse_kl":
            if self.config.posterior_init is None:  # start from the hint-SFT posterior
                hint = self.child(self.stage_dir("posterior_sft"), posterior_training="sft", rounds=1)
                hint._stage("posterior", hint.stage_hint_posterior)
                self.config = dataclasses.replace(
                    self.config, posterior_init=str(hint.stage_dir("posterior") / "final")
                )
            return self._stage("posterior", self.stage_reverse_kl_posterior)
        return self._stage("posterior", self.stage_hint_posterior)

    def run(self) -> dict[str, Any]:
        """Run (or resume) every stage of every round; the final model is `<run_dir>/final`.

        Round 1 is the released pipeline (stages 1–7). Round t ≥ 2 (Algorithm 1, `rounds`) runs in
        `<run_dir>/round<t>/`: π ← round t−1's final model, q ← Eq. 9 forward-KL training on π's own
        traces (starting from round t−1's posterior), then stages 3–7 again.
        """
        problem = single_process_problem(self.training)
        if problem is not None:  # before any stage folder is written
            raise RuntimeError(problem)
        self.tokenizer = load_tokenizer(self.base_path)
        info: dict[str, Any] = {}
        if self.config.prior_path is None:
            info["prior"] = self._stage("prior", self.stage_prior)
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
            publish_model(str(final), target, self.dtype)
        (self.run_dir / "pipeline.json").write_text(
            json.dumps({"config": dataclasses.asdict(self.config), "stages": info}, indent=2, default=str)
        )
        return info
