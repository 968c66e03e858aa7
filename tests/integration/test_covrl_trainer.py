"""The CoVRL trainer on the real stack: hybrid sampling, both template passes, rewards, baselines, truncation."""

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from reasoning.data.datasets import load_records
from reasoning.data.templates import encode
from reasoning.objectives.policy import group_baseline_advantages
from reasoning.recipes import load_recipe
from reasoning.rewards.likelihood import group_reward_std
from reasoning.rewards.verifier import correctness
from reasoning.rollout import Sampling
from reasoning.rollout.hf import HFEngine
from reasoning.testing import cpu_training_args
from reasoning.trainers.covrl import CoVRLConfig, CoVRLTrainer

ROOT = Path(__file__).resolve().parents[2]
DATA = "synthetic:addition?digits=3&n=64&seed=3&split=train"


def make_trainer(
    path, output_dir, engine=None, max_steps=2, temperature=1.0, max_tokens=40, args=None, **config
):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    values = dict(max_steps=max_steps, per_device_train_batch_size=8, gradient_accumulation_steps=2)
    training = cpu_training_args(output_dir, **{**values, **(args or {})})
    return CoVRLTrainer(
        model=model,
        args=training,
        config=CoVRLConfig(**{"num_generations": 4, **config}),
        train_dataset=load_records(DATA),
        processing_class=tokenizer,
        reward_funcs=[correctness],
        engine=engine or HFEngine(model=model, tokenizer=tokenizer),
        sampling=Sampling(temperature=temperature, max_tokens=max_tokens, seed=0),
    )


def generation(trainer, num_prompts):
    rows = [trainer.train_dataset[i] for i in range(num_prompts)]
    groups = trainer.generate(rows)
    batch = trainer.build_batch(rows, groups, trainer.score(rows, groups))
    return rows, groups, batch


def full_logits_logprobs(model, prompt, completion, temperature=1.0):
    """log softmax(logits/τ) of each completion token, from one unpadded forward (the reference)."""
    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float() / temperature
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)
    return logp[len(prompt) - 1 :]


def distinct_same_source_pairs(groups):
    """How many pairs of rollouts of one group and one source have different completions."""
    count = 0
    for group in groups:
        for a in range(len(group)):
            for b in range(a + 1, len(group)):
                same = group[a].extra["from_prior"] == group[b].extra["from_prior"]
                count += same and group[a].completion_ids != group[b].completion_ids
    return count


def logged(trainer):
    keys = set()
    for entry in trainer.state.log_history:
        keys |= set(entry)
    return keys


@pytest.mark.parametrize("level", ["rollout", "group"])
def test_hybrid_sampler_uses_the_prior_template_for_a_fraction_alpha(trained_tiny_dir, tmp_path, level):
    alpha = 0.25
    trainer = make_trainer(trained_tiny_dir, tmp_path, alpha=alpha, sampling_level=level, max_tokens=4)
    # the sampler's frequency, many draws
    flags = trainer.hybrid_sources(4000)
    per_unit = flags.float().view(-1) if level == "rollout" else flags[:, 0].float()
    assert abs(per_unit.mean().item() - alpha) < 4 * math.sqrt(alpha * (1 - alpha) / per_unit.numel())
    if level == "group":
        assert (flags == flags[:, :1]).all()
    # the rollouts the engine made: each from the template its flag names, in the drawn positions
    rows = [trainer.train_dataset[i] for i in range(16)]
    groups = trainer.generate(rows)
    expected = trainer.hybrid_sources(16)
    for row, group, drawn in zip(rows, groups, expected.tolist()):
        assert [r.extra["from_prior"] for r in group] == drawn
        for rollout in group:
            key = "prompt_ids" if rollout.extra["from_prior"] else "posterior_prompt_ids"
            assert rollout.prompt_ids == row[key]
    assert 0.05 < expected.float().mean().item() < 0.6
    assert distinct_same_source_pairs(groups) > 0  # duplicated prompts are sampled independently
    posterior = rows[0]["posterior_prompt_ids"]
    assert trainer.processing_class.decode(posterior).endswith(f"\nH:{rows[0]['answer']}\nT:")


def test_composite_logprobs_and_reward_equal_full_logits(trained_tiny_dir, tmp_path):
    temperature = 0.7
    trainer = make_trainer(trained_tiny_dir, tmp_path, temperature=temperature, alpha=0.5)
    rows, groups, batch = generation(trainer, 4)
    model = trainer.model
    with torch.no_grad():
        passes = trainer.template_passes(model, batch)
    from reasoning.objectives.covrl import composite_logprobs

    composite = composite_logprobs(passes["prior"], passes["posterior"])
    rollouts = [r for g in groups for r in g]
    assert batch["from_prior"].any() and (~batch["from_prior"]).any()
    tokenizer = trainer.processing_class
    for i, rollout in enumerate(rollouts):
        row = rows[i // 4]
        c = len(rollout.completion_ids)
        lp = full_logits_logprobs(model, row["prompt_ids"], rollout.completion_ids, temperature)
        lq = full_logits_logprobs(model, row["posterior_prompt_ids"], rollout.completion_ids, temperature)
        torch.testing.assert_close(passes["prior"][i, :c], lp, atol=1e-4, rtol=0)
        torch.testing.assert_close(passes["posterior"][i, :c], lq, atol=1e-4, rtol=0)
        reference = torch.logaddexp(lp, lq) - math.log(2)
        torch.testing.assert_close(composite[i, :c], reference, atol=1e-4, rtol=0)
        # the sampled source's log-probs are what the engine sampled with
        own = lp if rollout.extra["from_prior"] else lq
        torch.testing.assert_close(torch.tensor(rollout.logprobs), own, atol=1e-4, rtol=0)
        # reward: log p(y*|x, z) of the reference answer after the trace and its marker, at temperature 1,
        # EOS not scored; completions without a marker (or truncated) are excluded by default
        cut = trainer.cut(rollout)
        if rollout.truncated or cut.missing:
            assert math.isnan(batch["training_rewards"][i])
            continue
        marker = encode(tokenizer, "\nA:")
        answer_logp = full_logits_logprobs(
            model, list(row["prompt_ids"]) + cut.trace, marker + encode(tokenizer, row["answer"])
        )
        expected = answer_logp[len(marker) :].sum()
        assert abs(batch["training_rewards"][i].item() - expected.item()) < 1e-4
        assert batch["trace_mask"][i].sum() == len(cut.trace) + len(marker)


def test_training_steps_change_weights_and_log_both_sources(trained_tiny_dir, tmp_path):
    trainer = make_trainer(trained_tiny_dir, tmp_path / "run", max_steps=2, alpha=0.5)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.global_step == 2
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    keys = logged(trainer)
    for source in ("prior", "posterior"):
        assert {f"{source}/{m}" for m in ("reward", "length", "kl", "ratio", "rewards/correctness")} <= keys
    assert {"kl", "loss/surrogate", "loss/nll", "clip_ratio/region", "answer_logprob", "trace_length"} <= keys
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses and all(math.isfinite(x) for x in losses)
    assert max(e["kl"] for e in trainer.state.log_history if "kl" in e) > 0


def test_options_and_stored_old_passes(trained_tiny_dir, tmp_path):
    """Per-group sampling, composite ratio with w ≠ ½, sequence KL, decoder term, a batch that serves 2 steps."""
    trainer = make_trainer(
        trained_tiny_dir,
        tmp_path / "run",
        max_steps=2,
        args={"gradient_accumulation_steps": 1},
        steps_per_generation=2,
        sampling_level="group",
        ratio_to="composite",
        composite_weight=0.7,
        kl_weighting="sequence",
        answer_nll_coef=0.5,
        loss_type="sum",
        scale_advantages="group",
    )
    rows = [trainer.train_dataset[i] for i in range(4)]
    trainer._generate_and_buffer(rows)
    micro = trainer._buffer[0]
    assert "old_prior_logprobs" in micro and "old_posterior_logprobs" in micro and "answer_ids" in micro
    terms = trainer.loss_terms(trainer.model, micro)
    mask = terms["policy_mask"].bool()
    # at θ = θ_old the composite PPO ratio is 1: the stored old passes are the current ones
    torch.testing.assert_close(terms["ratio"][mask], torch.ones_like(terms["ratio"][mask]), atol=1e-5, rtol=0)
    assert terms["answer_nll"].item() > 0
    trainer.train()
    assert trainer.state.global_step == 2 and trainer.sync_count == 1


@pytest.mark.parametrize("reward", ["verifree", "rlpr", "jepo", "nover", "latro", "verifier"])
def test_baseline_rewards_run_one_step_prior_only(trained_tiny_dir, tmp_path, reward):
    trainer = make_trainer(
        trained_tiny_dir,
        tmp_path / "run",
        max_steps=1,
        args={"gradient_accumulation_steps": 1},
        reward=reward,
        alpha=1.0,
    )
    assert trainer.config.composite_weight == 1.0 and not trainer.needs_posterior_pass()
    calls = []
    passes = trainer.template_passes

    def spy(model, batch, posterior=True, answer=False):
        calls.append(posterior)
        return passes(model, batch, posterior=posterior, answer=answer)

    trainer.template_passes = spy
    trainer.train()
    keys = logged(trainer)
    entry = next(e for e in trainer.state.log_history if "hybrid/prior_fraction" in e)
    assert entry["hybrid/prior_fraction"] == 1.0  # α = 1: no posterior rollouts
    assert not any(k.startswith("posterior/") for k in keys)
    assert calls and not any(calls)  # the posterior template is never scored
    assert entry["kl"] == 0.0 and math.isfinite(entry["loss"])
    if reward in ("verifree", "jepo"):
        assert entry["loss/answer_nll"] != 0.0
    if reward == "latro":
        assert trainer.ref_model is not None


def replace_completion(trainer, rollout, ids, finish_reason):
    """Make `rollout` a completion of token ids `ids` (a case the sampler may not produce on its own)."""
    rollout.completion_ids = list(ids)
    rollout.logprobs = [0.0] * len(ids)
    rollout.finish_reason = finish_reason
    rollout.text = trainer.processing_class.decode(ids, skip_special_tokens=True)


def test_verifree_defaults_give_the_released_trainers_loss_on_the_real_model(trained_tiny_dir, tmp_path):
    """VeriFree's defaults (sail-sg/VeriFree verifree.py): R = p(y*|x, z) with no EOS scored, 0 without an
    answer marker or when truncated (kept in the RLOO group), loss −A Σ_t log π(z_t) (trace and marker,
    summed) − R Σ_t log p(y*_t|·), batch means. Gradients of the trainer's loss = the re-expressed one."""
    trainer = make_trainer(
        trained_tiny_dir, tmp_path, reward="verifree", alpha=1.0, args={"gradient_accumulation_steps": 1}
    )
    cfg = trainer.config
    assert (cfg.loss_type, cfg.truncated_reward, cfg.missing_answer, cfg.baseline) == (
        "sum",
        0.0,
        "zero",
        "rloo",
    )
    assert (cfg.nll_coef, cfg.answer_nll_coef, cfg.score_eos) == (0.0, 1.0, False)
    tokenizer = trainer.processing_class
    rows = [trainer.train_dataset[i] for i in range(2)]
    groups = trainer.generate(rows)
    eos = tokenizer.eos_token_id
    replace_completion(trainer, groups[0][0], encode(tokenizer, "1+2=3,4+5=9") + [eos], "stop")  # no marker
    replace_completion(trainer, groups[0][1], groups[0][1].completion_ids[:6], "length")  # truncated
    batch = trainer.build_batch(rows, groups, trainer.score(rows, groups))
    rewards = batch["training_rewards"]
    assert rewards[0] == 0 and rewards[1] == 0 and batch["missing_answer"][0]
    model = trainer.model
    marker = encode(tokenizer, "\nA:")
    checked = 0
    for i, rollout in enumerate(r for g in groups for r in g):
        cut = trainer.cut(rollout)
        if rollout.truncated or cut.missing:
            assert rewards[i] == 0
            continue
        row = rows[i // 4]
        logp = full_logits_logprobs(
            model, list(row["prompt_ids"]) + cut.trace, marker + encode(tokenizer, row["answer"])
        )
        assert rewards[i].item() == pytest.approx(logp[len(marker) :].sum().exp().item(), rel=1e-4, abs=1e-9)
        checked += 1
    assert checked >= 4
    grouped = rewards.view(-1, 4)
    rloo = ((grouped - grouped.mean(1, keepdim=True)) * 4 / 3).reshape(-1)
    torch.testing.assert_close(batch["advantages"], rloo, atol=1e-7, rtol=1e-6)
    assert batch["advantages"][0] < 0  # the markerless sample stays in its group with R = 0

    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(trainer.loss(model, batch).value, params, allow_unused=True)
    # re-expresses verifree.py (learning_step): pg = −A Σ_t logπ·think_mask, sft = −Σ_t logπ·answer_mask·R
    passes = trainer.template_passes(model, batch, posterior=False, answer=True)
    think = batch["trace_mask"].float()
    pg = (-batch["advantages"] * (passes["prior"] * think).sum(-1)).mean()
    sft = (-(passes["answer"] * passes["answer_mask"]).sum(-1) * rewards).mean()
    want = torch.autograd.grad(pg + sft, params, allow_unused=True)
    for g, w in zip(got, want):
        if w is None:
            assert g is None or g.abs().max() == 0
            continue
        torch.testing.assert_close(g, w, atol=1e-7, rtol=1e-4)
    assert max(w.abs().max() for w in want if w is not None) > 1e-4


def test_rlpr_defaults_format_term_std_scaling_and_filter_schedule(trained_tiny_dir, tmp_path):
    """RLPR's defaults (OpenBMB/RLPR): reward 0.9·clip(p̄ − p̄_noCoT) + 0.1·format, GRPO advantages
    (r − mean)/(std + 1e-6), a std filter that starts after a warm-up from β × the mean warm-up std."""
    trainer = make_trainer(
        trained_tiny_dir, tmp_path, reward="rlpr", alpha=1.0, rlpr_filter_ema_start=1, rlpr_filter_start=2
    )
    cfg = trainer.config
    assert (cfg.scale_advantages, cfg.truncated_reward, cfg.missing_answer) == ("group", "score", "zero")
    assert (cfg.rlpr_format_coef, cfg.rlpr_std_filter_beta, cfg.nll_coef) == (0.1, 0.5, 0.0)
    _, _, first = generation(trainer, 4)
    assert trainer.rlpr_threshold == 0.0  # generation 1 is the warm-up: nothing filtered
    rewards = first["training_rewards"]
    fmt = first["format_ok"]
    assert fmt.any() and (rewards[fmt] >= 0.1 - 1e-6).all() and (rewards <= 1.0).all()
    assert (rewards[first["missing_answer"]] == 0).all()
    std = group_reward_std(rewards, 4)
    grouped = rewards.view(-1, 4)
    expected = (grouped - grouped.mean(1, keepdim=True)) / (std.unsqueeze(1) + 1e-6)
    expected = torch.where(std.unsqueeze(1) < 1e-6, torch.zeros_like(expected), expected)
    torch.testing.assert_close(first["advantages"], expected.reshape(-1), atol=1e-5, rtol=1e-5)
    rows = [trainer.train_dataset[i] for i in range(4, 8)]
    groups = trainer.generate(rows)
    second = trainer.build_batch(rows, groups, trainer.score(rows, groups))
    bound = 0.5 * std[torch.isfinite(std)].mean().item()
    assert trainer.rlpr_threshold == pytest.approx(bound)
    std2 = group_reward_std(second["training_rewards"], 4)
    dropped = ~(std2 >= bound)
    assert (second["advantages"].view(-1, 4)[dropped] == 0).all()
    assert trainer.trainer_extra_state()["rlpr_filter"]["step"] == 2


def test_nover_defaults_rank_with_worst_one_over_n_and_zero_for_bad_format(trained_tiny_dir, tmp_path):
    trainer = make_trainer(trained_tiny_dir, tmp_path, reward="nover", alpha=1.0)
    assert trainer.config.nover_log_base == 10.0 and trainer.config.truncated_reward == 0.0
    _, groups, batch = generation(trainer, 4)
    rewards, fmt = batch["training_rewards"].view(-1, 4), batch["format_ok"].view(-1, 4)
    assert fmt.any()
    for row, ok in zip(rewards, fmt):
        n = int(ok.sum())
        assert (row[~ok] == 0).all()
        if n:  # the valid ones get n/n, (n − 1)/n, ..., 1/n
            assert sorted(row[ok].tolist()) == pytest.approx([k / n for k in range(1, n + 1)])


def test_truncated_samples_get_no_kl_term(trained_tiny_dir, tmp_path):
    trainer = make_trainer(trained_tiny_dir, tmp_path, alpha=0.5)
    _, _, batch = generation(trainer, 4)
    forced = dict(batch)
    forced["truncated"] = torch.arange(len(batch["truncated"])) % 2 == 0
    with torch.no_grad():
        terms = trainer.loss_terms(trainer.model, forced)
    assert terms["kl"][forced["truncated"]].abs().sum() == 0
    assert terms["kl"][~forced["truncated"]].abs().sum() > 0
    # really truncated completions (max_tokens 8): no reward, no advantage, no KL, no NLL
    trainer.sampling = Sampling(temperature=1.0, max_tokens=8, seed=0)
    _, _, batch = generation(trainer, 2)
    cut = batch["truncated"]
    assert cut.sum() >= 4 and torch.isnan(batch["training_rewards"][cut]).all()
    assert (batch["advantages"][cut] == 0).all() and not batch["well_formed"][cut].any()
    with torch.no_grad():
        terms = trainer.loss_terms(trainer.model, batch)
    assert terms["kl"][cut].abs().sum() == 0 and not terms["nll_selected"][cut].any()


def test_group_advantages_leave_out_nan_and_config_checks():
    rewards = torch.tensor([1.0, 3.0, math.nan, 2.0, 5.0, 5.0, 5.0, 5.0])
    mean = group_baseline_advantages(rewards, 4)
    torch.testing.assert_close(mean, torch.tensor([-1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]))
    rloo = group_baseline_advantages(rewards, 4, baseline="rloo")
    torch.testing.assert_close(rloo[:4], torch.tensor([-1.5, 1.5, 0.0, 0.0]))
    scaled = group_baseline_advantages(rewards, 4, scale="group", eps=0.0)
    torch.testing.assert_close(scaled[:2], torch.tensor([-1.0, 1.0]))
    assert CoVRLConfig(alpha=1.0).composite_weight == 1.0 and CoVRLConfig().composite_weight == 0.5
    assert (
        CoVRLConfig(reward="verifree").baseline == "rloo"
        and CoVRLConfig(reward="verifree").answer_nll_coef == 1
    )
    with pytest.raises(ValueError, match="reward 'best' is not one of"):
        CoVRLConfig(reward="best")
    with pytest.raises(ValueError, match="truncated_reward"):
        CoVRLConfig(truncated_reward="-inf")


def test_recipes_parse():
    demo = load_recipe(ROOT / "recipes/demo/covrl.yaml")
    assert demo.trainer == "covrl" and demo.method.alpha == 0.5 and demo.rollout.engine == "vllm"
    paper = load_recipe(ROOT / "recipes/papers/covrl_qwen2.5_7b.yaml")
    assert paper.model.path == "Qwen/Qwen2.5-7B" and paper.method.num_generations == 8
    assert paper.training["learning_rate"] == 1e-6 and paper.rollout.max_tokens == 2048
    assert (demo.method.loss_type, demo.method.nll_coef, demo.method.missing_answer) == (
        "grpo",
        0.1,
        "exclude",
    )
    baseline = load_recipe(
        ROOT / "recipes/demo/covrl.yaml", ["--covrl.reward", "verifree", "--covrl.alpha", "1"]
    )
    assert baseline.method.composite_weight == 1.0
    # the recipe leaves the per-reward defaults alone: the baseline gets its released trainer's
    method = baseline.method
    assert (method.loss_type, method.truncated_reward, method.missing_answer, method.nll_coef) == (
        "sum",
        0.0,
        "zero",
        0.0,
    )


@pytest.mark.vllm
@pytest.mark.slow
def test_covrl_with_vllm_engine(trained_tiny_dir, vllm_engine, tmp_path):
    trainer = make_trainer(trained_tiny_dir, tmp_path / "run", engine=vllm_engine, max_steps=2, alpha=0.5)
    rows = [trainer.train_dataset[i] for i in range(4)]
    groups = trainer.generate(rows)
    for row, group in zip(rows, groups):
        for rollout in group:
            key = "prompt_ids" if rollout.extra["from_prior"] else "posterior_prompt_ids"
            assert rollout.prompt_ids == row[key]
    assert distinct_same_source_pairs(groups) > 0  # seeded requests would repeat one sample
    trainer.train()
    assert trainer.sync_count == 2
    keys = logged(trainer)
    assert {"prior/reward", "posterior/reward", "prior/kl", "posterior/ratio"} <= keys
    differences = [
        e["sampling/logp_difference_mean"]
        for e in trainer.state.log_history
        if "sampling/logp_difference_mean" in e
    ]
    # both templates' rollouts were sampled with the trainer's weights and the right prompt
    assert differences and max(differences) < 1e-4
    vllm_engine.sync_weights(AutoModelForCausalLM.from_pretrained(trained_tiny_dir))
