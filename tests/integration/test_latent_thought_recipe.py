"""`reasoning train recipes/demo/latent_thought.yaml` through the real CLI, shrunk by overrides."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import reasoning.models.latent_thought  # noqa: F401  (registers the model with the Auto classes)
from reasoning.models.latent_thought import LatentThoughtForCausalLM


def test_latent_thought_recipe_trains_saves_and_reloads(tmp_path, run_cli):
    out = tmp_path / "ltm"
    result = run_cli(
        "train",
        "recipes/demo/latent_thought.yaml",
        "--training.output_dir",
        str(out),
        "--training.max_steps",
        "3",
        "--training.logging_steps",
        "1",
        "--training.disable_tqdm",
        "true",
        "--model.latent_thought",
        "{hidden_size: 32, num_layers: 1, num_heads: 1, intermediate_size: 64, latents_per_layer: 2}",
        "--data.train",
        "synthetic:addition?digits=2&n=48&seed=0&split=train",
        "--latent_thought.fast_steps",
        "2",
        "--latent_thought.inference_steps",
        "2",
        "--latent_thought.heldout_questions",
        "4",
        "--latent_thought.num_inits",
        "2",
        env={"OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "latent/nelbo_end" in m and "loss" in m]
    assert len(steps) == 3 and all(m["latent/nelbo_end"] < m["latent/nelbo_start"] for m in steps)

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert isinstance(model, LatentThoughtForCausalLM)
    assert model.config.latent_shape == (1, 2, 32)
    prompt = tokenizer("Q:12+34\nT:", return_tensors="pt")
    z = torch.randn(1, *model.config.latent_shape, generator=torch.Generator().manual_seed(0))
    tokens = model.generate(**prompt, latents=z, max_new_tokens=6, do_sample=False)
    assert tokens.shape[1] > prompt["input_ids"].shape[1]

    report = json.loads((out / "latent_eval.json").read_text())
    assert report["global_step"] == 3
    assert report["elbo"]["num_sequences"] == 1  # 4 held-out records, 4 per text
    assert report["elbo"]["perplexity_upper_bound"] > 1
    # one held-out text: the reference's mean over texts of exp(NELBO/N) is the same number
    assert report["elbo"]["perplexity_sequence_mean"] == pytest.approx(
        report["elbo"]["perplexity_upper_bound"]
    )
    assert report["few_shot"]["num_inits"] == 2 and report["few_shot"]["shots"] == 2
    assert report["few_shot_prior_z"]["num_inits"] == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainer"] == "latent_thought" and summary["train_seconds"] > 0
