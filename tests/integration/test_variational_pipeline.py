"""The variational-reasoning pipeline end to end on a tiny model with real vLLM sampling.

Stages 1–2 (SFT) use a few steps from the base; stages 3–7 run for real; then the stage outputs
are checked against independent recomputation, and a rerun is checked to skip finished stages.
"""

import json
import math

import pytest
import torch
from datasets import load_from_disk
from transformers import AutoModelForCausalLM, AutoTokenizer

from reasoning.data.datasets import load_records
from reasoning.data.templates import PlainTemplate, encode, find_last
from reasoning.rewards.verifier import is_correct
from reasoning.trainers.variational import VariationalConfig, VariationalReasoningPipeline

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


class SharedEngine:
    """The session's vLLM engine, loaded with the stage's model; `close` keeps it alive."""

    def __init__(self, engine, model):
        self.engine = engine
        engine.sync_weights(model)

    def generate(self, prompts, sampling, n=1):
        return self.engine.generate(prompts, sampling, n)

    def close(self):
        pass


def make_pipeline(tmp_path, trained_tiny_dir, vllm_engine, **overrides):
    records = load_records("synthetic:addition?digits=3&n=400&seed=7&split=train")
    values = dict(
        num_traces=4,
        answer_samples=4,
        answer_max_tokens=8,
        num_questions=12,
        prior_path=str(trained_tiny_dir),
        posterior_steps=8,
        final_steps=4,
        max_length=128,
        heldout="synthetic:addition?digits=3&n=50&seed=12345&split=test",
        heldout_questions=6,
    )
    config = VariationalConfig(**{**values, **overrides})
    training = {
        "output_dir": str(tmp_path / "run"),
        "per_device_train_batch_size": 16,
        "learning_rate": 1e-3,
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": True,
        "use_cpu": True,
        "seed": 0,
    }
    return VariationalReasoningPipeline(
        config,
        str(trained_tiny_dir),
        records,
        training,
        lambda path, model, tokenizer: SharedEngine(vllm_engine, model),
        trace_max_tokens=48,
    )


def test_pipeline_stages_are_consistent_and_resume(tmp_path, trained_tiny_dir, vllm_engine):
    pipeline = make_pipeline(tmp_path, trained_tiny_dir, vllm_engine)
    info = pipeline.run()
    run = tmp_path / "run"
    for stage in ("posterior", "samples", "scores", "accuracy", "weights", "final_sft", "heldout_bound"):
        assert (run / stage / "DONE").exists(), stage
    assert (run / "final" / "config.json").exists()
    assert not (run / "prior").exists()  # prior_path given: stage 1 skipped

    tokenizer = AutoTokenizer.from_pretrained(trained_tiny_dir)
    template = PlainTemplate()
    records = pipeline.sampled_questions()
    samples = load_from_disk(str(run / "accuracy" / "data"))
    assert len(samples) == 12 * 4
    marker = encode(tokenizer, template.answer_prefix)

    # traces are cut at the answer marker's tokens: prefix of the completion, marker follows
    completion_ids = [encode(tokenizer, s["completion"]) for s in samples]
    for sample, ids in zip(samples, completion_ids):
        if sample["valid"]:
            assert ids[: len(sample["trace_ids"])] == sample["trace_ids"]
            assert find_last(ids, marker) == len(sample["trace_ids"])
            assert 0 <= sample["answers_correct"] <= 4
    assert sum(s["valid"] for s in samples) > 0
    # each trace keeps a correct answer sampled after it (the final SFT target), when there is one
    for sample in samples:
        record = records[sample["question_index"]]
        if sample["answers_correct"]:
            assert is_correct(sample["trace"] + template.answer_prefix + sample["sampled_answer"], record)
        else:
            assert sample["sampled_answer"] is None

    # scores equal an independent full-logits recomputation under the prior and the posterior
    prior = AutoModelForCausalLM.from_pretrained(trained_tiny_dir, dtype=torch.float32)
    posterior = AutoModelForCausalLM.from_pretrained(run / "posterior" / "final", dtype=torch.float32)
    for sample in list(samples)[:6]:
        row = records[sample["question_index"]]
        prior_prompt = encode(tokenizer, template.prior_prompt(row["question"]))
        post_prompt = encode(tokenizer, template.posterior_prompt(row["question"], row["answer"]))
        answer_ids = encode(tokenizer, row["answer"]) + [tokenizer.eos_token_id]
        trace = sample["trace_ids"] + marker

        def logps(model, prompt, continuation):
            ids = torch.tensor([prompt + continuation])
            with torch.no_grad():
                logits = model(ids).logits[0, len(prompt) - 1 : -1]
            return torch.log_softmax(logits, -1).gather(-1, torch.tensor(continuation)[:, None]).squeeze(-1)

        full = logps(prior, prior_prompt, trace + answer_ids)
        assert sample["trace_length"] == len(trace)
        assert math.isclose(sample["trace_logp_prior"], full[: len(trace)].sum().item(), abs_tol=1e-3)
        assert torch.allclose(torch.tensor(sample["answer_token_logps"]), full[len(trace) :], atol=1e-4)
        post = logps(posterior, post_prompt, trace).sum().item()
        assert math.isclose(sample["trace_logp_posterior"], post, abs_tol=1e-3)

    # weights: each question's traces carry K·ρ̃ (sum K) or the question falls back to its solution
    final = load_from_disk(str(run / "weights" / "data"))
    stats = json.loads((run / "weights" / "stats.json").read_text())
    totals = {}
    for row in final:
        totals[row["question"]] = totals.get(row["question"], 0.0) + row["weight"]
    fallback = sum(1 for q, t in totals.items() if math.isclose(t, 1.0))
    assert all(math.isclose(t, 4.0, rel_tol=1e-6) or math.isclose(t, 1.0) for t in totals.values())
    assert stats["fallback_questions"] == fallback
    assert len(totals) == 12
    bound = info["heldout_bound"]["iwae_bound"]
    assert set(bound) == {"1", "2", "4"} and all(math.isfinite(v) for v in bound.values())
    assert (run / "heldout_bound" / "iwae_bound.png").stat().st_size > 1000

    # rerun: every stage is skipped (data untouched), and the same final model is reported
    stamp = (run / "samples" / "data").stat().st_mtime_ns
    again = make_pipeline(tmp_path, trained_tiny_dir, vllm_engine).run()
    assert (run / "samples" / "data").stat().st_mtime_ns == stamp
    assert again["weights"] == info["weights"]

    # removing a stage's marker reruns that stage only, from the saved inputs, with the same result
    (run / "weights" / "DONE").unlink()
    again = make_pipeline(tmp_path, trained_tiny_dir, vllm_engine).run()
    assert again["weights"] == info["weights"]


def test_no_hint_ablation_samples_from_the_prior(tmp_path, trained_tiny_dir, vllm_engine):
    pipeline = make_pipeline(
        tmp_path, trained_tiny_dir, vllm_engine, no_hint=True, estimator="gml", heldout=None
    )
    pipeline.run()
    run = tmp_path / "run"
    assert not (run / "posterior").exists()
    scored = load_from_disk(str(run / "scores" / "data"))
    # q = π_θ0 with the prior prompt: the per-token trace ratio is exactly 1
    for row in scored:
        assert math.isclose(row["trace_logp_prior"], row["trace_logp_posterior"], abs_tol=1e-4)


def test_bad_configuration_is_a_clear_error():
    with pytest.raises(ValueError, match="estimator must be one of"):
        VariationalConfig(estimator="accuracy")
    with pytest.raises(ValueError, match="answer_samples >= 1"):
        VariationalConfig(estimator="acc", answer_samples=0)


def test_forward_kl_posterior_and_a_second_round(tmp_path, trained_tiny_dir, vllm_engine):
    """Eq. 9 posterior training on the prior's own traces, then round 2 of Algorithm 1."""
    pipeline = make_pipeline(
        tmp_path,
        trained_tiny_dir,
        vllm_engine,
        posterior_training="forward_kl",
        estimator="gml",
        rounds=2,
        heldout=None,
    )
    info = pipeline.run()
    run = tmp_path / "run"
    # q was trained on traces sampled from π_θ0 with the prior prompt, weighted within each question
    traces = load_from_disk(str(run / "posterior" / "prior_traces" / "scores" / "data"))
    for row in list(traces)[:8]:
        assert math.isclose(row["trace_logp_prior"], row["trace_logp_posterior"], abs_tol=1e-4)
    weighted = load_from_disk(str(run / "posterior" / "data"))
    totals = {}
    for row in weighted:
        totals[row["question"]] = totals.get(row["question"], 0.0) + row["weight"]
    assert totals and all(math.isclose(t, 4.0, rel_tol=1e-6) for t in totals.values())
    # round 2: π is round 1's final model, q starts from round 1's posterior, and its final model is the run's
    round2 = info["round2"]
    assert (run / "round2" / "posterior" / "DONE").exists() and (
        run / "round2" / "final_sft" / "DONE"
    ).exists()
    config = json.loads((run / "round2" / "pipeline.json").read_text())["config"]
    assert config["prior_path"] == str(run / "final_sft" / "final")
    assert config["posterior_init"] == str(run / "posterior" / "final")
    final = AutoModelForCausalLM.from_pretrained(run / "final")
    last = AutoModelForCausalLM.from_pretrained(round2["final"]["path"])
    for (name, a), (_, b) in zip(final.state_dict().items(), last.state_dict().items()):
        assert torch.equal(a, b), name
