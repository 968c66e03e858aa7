"""The online variational trainer on the real stack: two steps with transformers rollouts, then a resume."""

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from reasoning.data.datasets import load_records
from reasoning.recipes import load_recipe
from reasoning.rewards.verifier import correctness
from reasoning.rollout import Sampling
from reasoning.rollout.hf import HFEngine
from reasoning.trainers.variational_online import OnlineVariationalConfig, OnlineVariationalTrainer

ROOT = Path(__file__).resolve().parents[2]


def make_trainer(path, output_dir):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=2,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_steps=2,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    # GML weights: the 60-step model rarely answers correctly, so Acc would give φ no signal
    config = OnlineVariationalConfig(
        num_generations=4, estimator="gml", answer_samples=0, phi_learning_rate=1e-3
    )
    trainer = OnlineVariationalTrainer(
        model=model,
        args=args,
        config=config,
        train_dataset=load_records("synthetic:addition?digits=3&n=64&seed=3&split=train"),
        processing_class=tokenizer,
        reward_funcs=[correctness],
        engine=HFEngine(model=model, tokenizer=tokenizer),
        sampling=Sampling(temperature=1.0, max_tokens=40, seed=0),
    )
    return trainer, model


def test_two_steps_change_both_models_log_metrics_and_resume_phi(tmp_path, trained_tiny_dir):
    trainer, model = make_trainer(trained_tiny_dir, tmp_path / "run")
    theta_before = [p.detach().clone() for p in model.parameters()]
    phi_before = [p.detach().clone() for p in trainer.phi.parameters()]
    trainer.train()

    assert trainer.state.global_step == 2 and trainer.phi_updates == 2
    assert any(not torch.equal(a, b) for a, b in zip(theta_before, model.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(phi_before, trainer.phi.parameters()))
    logs = [h for h in trainer.state.log_history if "loss/theta" in h]
    assert len(logs) == 2
    for name in ("iwae_bound", "posterior/accuracy", "prior/accuracy", "loss/phi", "loss/theta"):
        assert all(name in h for h in logs), name
    # the ESS is defined only for questions with a weighted trace (others fall back to the reference);
    # it lies between 1 and K = 4 traces
    ess = [h["theta/ess"] for h in logs if "theta/ess" in h]
    assert ess and all(1.0 <= value <= 4.0 for value in ess), ess
    for h in logs:
        assert h["iwae_bound"] < 0  # log (1/K) Σ π(z, y*|x)/q(z|x, y′) of an untrained task model
        assert 0.0 <= h["posterior/accuracy"] <= 1.0 and 0.0 <= h["prior/accuracy"] <= 1.0
        assert abs(h["loss/theta"] - h["loss"]) < 1e-3 * max(1.0, abs(h["loss"]))
    logged = [json.loads(line) for line in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert logged and all(
        "\nH:" in r["prompt"] for r in logged
    )  # q_φ's samples, shown with their hint prompt

    # a new trainer resumed from the checkpoint restores q_φ (weights and optimizer) and its counter
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert checkpoint.is_dir()
    resumed, _ = make_trainer(trained_tiny_dir, tmp_path / "run")
    assert any(not torch.equal(a, b) for a, b in zip(resumed.phi.parameters(), trainer.phi.parameters()))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.phi_updates == 2
    for a, b in zip(resumed.phi.parameters(), trainer.phi.parameters()):
        assert torch.equal(a, b)
    state = resumed.side_parameters["phi"].optimizer.state_dict()["state"]
    saved = trainer.side_parameters["phi"].optimizer.state_dict()["state"]
    assert saved and all(torch.equal(state[k]["exp_avg"], saved[k]["exp_avg"]) for k in saved)


def test_demo_recipe_parses_to_the_online_trainer():
    recipe = load_recipe(ROOT / "recipes" / "demo" / "variational_online.yaml")
    assert recipe.trainer == "variational_online"
    assert isinstance(recipe.method, OnlineVariationalConfig)
    assert recipe.method.posterior_objective == "forward_kl"
