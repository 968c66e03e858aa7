"""The Bayes / DPG trainer on the real stack: frozen base scoring, per-prompt Z, warpers, LoRA, proposal."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from reasoning.data.datasets import load_records
from reasoning.objectives.bayes import estimate_log_z, f_pseudo_reward, fit_conditional_moment_lambdas
from reasoning.rewards.verifier import correctness
from reasoning.rollout import Sampling
from reasoning.rollout.hf import HFEngine
from reasoning.trainers.bayes import BayesConfig, BayesTrainer

DATA = "synthetic:addition?digits=3&n=64&seed=3&split=train"


def length_reward(prompts, completions, **columns):
    """A reward that differs between completions (and so between prompts' Z)."""
    return [-len(c) / 20 for c in completions]


def short_feature(prompts, completions, **columns):
    return [float(len(c) < 24) for c in completions]


def make_trainer(path, output_dir, model=None, engine=None, sampling=None, max_steps=2, **config):
    model = model if model is not None else AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        logging_steps=1,
        save_steps=2,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    config = {"num_generations": 4, "log_completions": False, **config}
    feature_funcs = config.pop("feature_funcs", None)
    return BayesTrainer(
        model=model,
        args=args,
        config=BayesConfig(**config),
        train_dataset=load_records(DATA),
        processing_class=tokenizer,
        reward_funcs=[correctness, length_reward],
        engine=engine or HFEngine(model=model, tokenizer=tokenizer),
        sampling=sampling or Sampling(temperature=1.0, max_tokens=40, seed=0),
        feature_funcs=feature_funcs,
    )


def one_generation(trainer):
    rows = next(iter(trainer.get_train_dataloader()))
    groups = trainer.generate(rows)
    return rows, groups, trainer.build_batch(rows, groups, trainer.score(rows, groups))


@torch.no_grad()
def full_logits_logprob(model, prompt_ids, completion_ids, **warpers):
    """Σ_t log softmax(logits_t)[x_t] of one unpadded sequence, from the full logits."""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].double()
    logits = logits / warpers.get("temperature", 1.0)
    if warpers.get("top_k"):
        kth = logits.topk(warpers["top_k"], dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion_ids)[:, None]).sum()


def test_base_scoring_per_prompt_z_frozen_base_and_training(trained_tiny_dir, tmp_path):
    trainer = make_trainer(trained_tiny_dir, tmp_path / "run", target="tilt", beta=1.0, divergence="fkl")
    reference = AutoModelForCausalLM.from_pretrained(trained_tiny_dir, dtype=torch.float32)
    rows, groups, batch = one_generation(trainer)
    rollouts = [r for group in groups for r in group]
    expected = torch.stack([full_logits_logprob(reference, r.prompt_ids, r.completion_ids) for r in rollouts])
    assert torch.allclose(batch["log_base"].double(), expected, atol=2e-4)
    # log q = the engine's sampling log-probs (online), which equal log a before any step
    assert torch.allclose(batch["log_proposal"].double(), expected, atol=2e-4)
    lengths = torch.tensor([-len(r.text) / 20 for r in rollouts], dtype=torch.float64)
    correct = batch["rewards"].double() - lengths  # correctness + length reward, weights 1
    assert torch.allclose(correct, correct.round(), atol=1e-5) and set(correct.round().tolist()) <= {0.0, 1.0}
    # tilt with β = 1: log P = log a + r
    assert torch.allclose(batch["log_target"].double(), expected + batch["rewards"].double(), atol=2e-4)
    # one Ẑ per prompt: log mean over that prompt's samples of P/q, stored under the prompt
    per_prompt = estimate_log_z(
        batch["log_target"].view(-1, 4).double(), batch["log_proposal"].view(-1, 4).double()
    )
    assert torch.allclose(batch["log_z"].view(-1, 4).double(), per_prompt[:, None].expand(-1, 4), atol=1e-5)
    assert len(set(per_prompt.tolist())) > 1  # differs between prompts
    for row, value in zip(rows, per_prompt):
        ((stored, count),) = trainer.log_z_state[row["prompt"]]
        assert stored == pytest.approx(float(value), abs=1e-5) and count == 4

    base_before = {n: p.detach().clone() for n, p in trainer.base_model.named_parameters()}
    policy_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert all(torch.equal(base_before[n], p) for n, p in trainer.base_model.named_parameters())
    assert any(not torch.equal(policy_before[n], p) for n, p in trainer.model.named_parameters())
    assert not any(p.requires_grad for p in trainer.base_model.parameters())
    logs = [e for e in trainer.state.log_history if "bayes/log_z" in e]
    assert len(logs) == 2 and {
        "bayes/z",
        "bayes/kl_target_policy",
        "bayes/tv_target_policy",
        "bayes/kl_policy_base",
        "bayes/reward",
        "bayes/ess",
        "bayes/proposal_updated",
        "diversity/distinct_answers",
        "diversity/distinct_correct_answers",
        "diversity/distinct_2",
        "sampling/logp_difference_mean",
    } <= set(logs[0])
    assert logs[0]["sampling/logp_difference_mean"] < 1e-4
    assert logs[-1]["bayes/kl_policy_base"] > 0  # the policy moved away from the base


def test_sampling_warpers_are_enforced_or_scored(trained_tiny_dir, tmp_path):
    for sampling in (Sampling(temperature=0.7), Sampling(top_k=5), Sampling(top_p=0.9)):
        with pytest.raises(ValueError, match="score_with_sampling_warpers: true"):
            make_trainer(trained_tiny_dir, tmp_path / "x", sampling=sampling)
    with pytest.raises(ValueError, match="greedy"):
        make_trainer(trained_tiny_dir, tmp_path / "x", sampling=Sampling(temperature=0.0))
    with pytest.raises(ValueError, match="rkl"):
        BayesConfig(divergence="rkl", target="pointwise")
    # allowed explicitly: a, π and q are all scored with the sampling warpers
    sampling = Sampling(temperature=0.8, top_k=6, max_tokens=30, seed=1)
    trainer = make_trainer(
        trained_tiny_dir, tmp_path / "w", sampling=sampling, score_with_sampling_warpers=True, target="tilt"
    )
    reference = AutoModelForCausalLM.from_pretrained(trained_tiny_dir, dtype=torch.float32)
    _, groups, batch = one_generation(trainer)
    rollouts = [r for group in groups for r in group]
    expected = torch.stack(
        [
            full_logits_logprob(reference, r.prompt_ids, r.completion_ids, temperature=0.8, top_k=6)
            for r in rollouts
        ]
    )
    assert torch.allclose(batch["log_base"].double(), expected, atol=2e-4)
    assert torch.allclose(batch["log_proposal"].double(), expected, atol=2e-4)  # the engine's warped q


def test_lora_policy_uses_the_adapter_disabled_base(trained_tiny_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(trained_tiny_dir, dtype=torch.float32)
    policy = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    trainer = make_trainer(trained_tiny_dir, tmp_path / "lora", model=policy, target="tilt", beta=1.0)
    assert trainer.base_model is None
    reference = AutoModelForCausalLM.from_pretrained(trained_tiny_dir, dtype=torch.float32)
    _, groups, batch = one_generation(trainer)
    rollouts = [r for group in groups for r in group]
    expected = torch.stack([full_logits_logprob(reference, r.prompt_ids, r.completion_ids) for r in rollouts])
    assert torch.allclose(batch["log_base"].double(), expected, atol=2e-4)
    # the adapter changes the policy: its (engine) log-probs are not the base's
    assert (batch["log_proposal"].double() - expected).abs().max() > 1e-2
    lora_before = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" in n}
    trainer.train()
    assert any(not torch.equal(lora_before[n], p) for n, p in policy.named_parameters() if "lora_" in n)
    one = trainer.collate_rollouts([[rollouts[0]]])
    assert trainer.base_logprobs(one).sum().item() == pytest.approx(expected[0].item(), abs=2e-4)
    # scoring the base leaves the adapter enabled: the policy is still the adapted model
    assert abs(trainer.logprobs_without_grad(trainer.model, one).sum().item() - expected[0].item()) > 1e-2


def test_offline_proposal_updates_and_state_survives_checkpoint(trained_tiny_dir, tmp_path):
    trainer = make_trainer(
        trained_tiny_dir,
        tmp_path / "run",
        proposal="offline",
        proposal_update_every=1,
        proposal_update_metric="always",
        target="tilt",
        beta=1.0,
        baseline="moving_average",
    )
    assert trainer.engine.model is trainer.proposal_model  # the hf engine samples from q, not π
    trainer.train()
    assert trainer.proposal_updates == 2 and trainer.sync_count == 2
    flags = [e["bayes/proposal_updated"] for e in trainer.state.log_history if "bayes/proposal_updated" in e]
    assert flags == [1.0, 1.0]
    assert any(
        not torch.equal(p, q) for p, q in zip(trainer.model.parameters(), trainer.proposal_model.parameters())
    )  # q is π as it was at the last update, before the last optimizer step
    checkpoint = tmp_path / "run" / "checkpoint-2"
    restored = make_trainer(
        trained_tiny_dir,
        tmp_path / "other",
        proposal="offline",
        target="tilt",
        beta=1.0,
        baseline="moving_average",
    )
    restored.restore_checkpoint_state(checkpoint)  # what train(resume_from_checkpoint=...) calls
    assert restored.log_z_state == trainer.log_z_state and len(restored.log_z_state) == 4
    assert restored.baseline_value == trainer.baseline_value is not None
    assert restored.baseline_window_values == trainer.baseline_window_values != []
    assert restored.proposal_updates == 2 and restored._proposal_dirty
    assert all(
        torch.equal(a, b)
        for a, b in zip(restored.proposal_model.parameters(), trainer.proposal_model.parameters())
    )

    # the adaptive rule: q is replaced exactly when π's estimated KL(p‖·) is lower than q's
    adaptive = make_trainer(
        trained_tiny_dir,
        tmp_path / "kl",
        proposal="offline",
        proposal_update_every=1,
        target="tilt",
        beta=0.5,
        max_steps=3,
    )
    adaptive.train()
    checks = [e for e in adaptive.state.log_history if "bayes/update_metric_policy" in e]
    assert len(checks) == 3
    for entry in checks:
        closer = entry["bayes/update_metric_policy"] < entry["bayes/update_metric_proposal"]
        assert entry["bayes/proposal_updated"] == float(closer)
    assert adaptive.proposal_updates == sum(e["bayes/proposal_updated"] for e in checks)


def test_offline_moving_average_baseline_matches_disco(trained_tiny_dir, tmp_path):
    """q ≠ π (the policy perturbed after the snapshot): the window of −f′(π/p) over earlier generations
    is the baseline b, none at first, and the loss and its gradient are disco's
    mean((π/q)·(−(p/π − b))·log π) (naver/disco/disco/tuners/losses/f_divergence.py, re-expressed)."""
    trainer = make_trainer(
        trained_tiny_dir,
        tmp_path / "run",
        proposal="offline",
        target="tilt",
        beta=1.0,
        divergence="fkl",
        baseline="moving_average",
        baseline_window=6,
    )
    model = trainer.model
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for parameter in model.parameters():  # π moves away from the snapshot q
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    _, _, first = one_generation(trainer)
    assert torch.all(first["baseline_value"] == 0)  # disco: no baseline before the first window
    mask = first["completion_mask"].float()
    log_pi_first = (trainer.logprobs_without_grad(model, first) * mask).sum(-1).double()
    assert (log_pi_first - first["log_proposal"].double()).abs().max() > 1e-2  # q ≠ π
    r_f = f_pseudo_reward("fkl", first["log_target"].double(), first["log_z"].double(), log_pi_first)
    assert trainer.baseline_window_values == pytest.approx(r_f[-6:].tolist(), rel=1e-4)
    _, _, second = one_generation(trainer)
    b = sum(r_f[-6:].tolist()) / 6
    assert second["baseline_value"].double().tolist() == pytest.approx([b] * 8, rel=1e-5)

    model.zero_grad()
    loss = trainer.loss(model, second).value
    loss.backward()
    ours = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    token_logp, _ = trainer.policy_logprobs(model, second)
    log_pi = (token_logp * second["completion_mask"].float()).sum(-1).double()
    # re-expresses naver/disco/disco/tuners/losses/f_divergence.py (FDivergenceLoss.__call__), KL's f′
    log_t = log_pi.detach() - (second["log_target"].double() - second["log_z"].double())
    advantage = torch.exp(-log_t) - second["baseline_value"].double()
    ratios = (log_pi.detach() - second["log_proposal"].double()).exp()
    reference = (ratios * (-advantage) * log_pi).mean()
    reference.backward()
    theirs = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert len(ours) == len(theirs) and all(
        torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(ours, theirs)
    )
    assert max(g.abs().max().item() for g in theirs) > 1e-5


def test_moment_target_fits_lambda(trained_tiny_dir, tmp_path):
    # exact: two contexts, uniform proposal = base, φ ∈ {0, 1}
    features = torch.tensor([[1.0], [0.0], [0.0], [0.0], [1.0], [1.0], [0.0], [0.0]])
    index = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    lam = fit_conditional_moment_lambdas(features, torch.zeros(8), index, torch.tensor([0.5]))
    w = torch.exp(lam * features.squeeze(-1)).view(2, 4)
    moments = ((w * features.view(2, 4)).sum(-1) / w.sum(-1)).mean()
    assert moments.item() == pytest.approx(0.5, abs=1e-6)

    trainer = make_trainer(
        trained_tiny_dir,
        tmp_path / "m",
        target="moments",
        moment_features=["short"],
        moment_targets=[0.5],
        moment_fit_samples=32,
        feature_funcs={"short": short_feature},
        max_steps=1,
    )
    trainer.train()
    entry = next(e for e in trainer.state.log_history if "bayes/fitted_moment/short" in e)
    assert entry["bayes/fitted_moment/short"] == pytest.approx(0.5, abs=1e-3)
    assert trainer.moment_lambdas is not None and "bayes/moment/short" in entry


@pytest.mark.vllm
@pytest.mark.slow
def test_offline_proposal_with_vllm_engine(trained_tiny_dir, vllm_engine, tmp_path):
    trainer = make_trainer(
        trained_tiny_dir,
        tmp_path / "run",
        engine=vllm_engine,
        proposal="offline",
        proposal_update_every=1,
        proposal_update_metric="always",
        target="tilt",
        beta=1.0,
    )
    trainer.train()
    assert trainer.sync_count == 2  # the engine receives q once at start and after the first update
    differences = [
        e["sampling/logq_difference_mean"]
        for e in trainer.state.log_history
        if "sampling/logq_difference_mean" in e
    ]
    assert differences and max(differences) < 1e-3  # engine q = teacher-forced snapshot q
    vllm_engine.sync_weights(AutoModelForCausalLM.from_pretrained(trained_tiny_dir))
