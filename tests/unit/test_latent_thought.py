"""Latent thought model: architecture, the dual-rate fast loop, the Trainer, save/load and inference helpers."""

import math

import pytest
import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM, TrainingArguments

from reasoning.data.datasets import load_records
from reasoning.data.synthetic import records_from_spec
from reasoning.eval.latent_thought import (
    choose_demonstrations,
    evaluate_latent_thought,
    few_shot_accuracy,
    few_shot_prompt,
    first_example,
    token_perplexity,
)
from reasoning.models.latent_inference import (
    cosine_step_size,
    document_texts,
    elbo_perplexity,
    fit_posterior,
    generate_with_inference,
    record_text,
    scored_token_mask,
    tokenize_texts,
)
from reasoning.models.latent_thought import (
    LatentThoughtConfig,
    LatentThoughtForCausalLM,
    build_latent_thought_checkpoint,
    build_latent_thought_model,
    self_attention_mask,
)
from reasoning.models.tiny import build_char_tokenizer
from reasoning.objectives.latent import gaussian_kl_standard_normal
from reasoning.recipes import RecipeError, build_trainer, load_model_and_tokenizer, parse_recipe
from reasoning.testing import cpu_training_args
from reasoning.trainers.latent_thought import DualRateConfig, LatentThoughtCollator, LatentThoughtTrainer

SMALL = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128, "latents_per_layer": 4}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread is faster than two on a shared 2-core machine, and deterministic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def dataset(tokenizer):
    records = records_from_spec("addition?digits=2&n=48&seed=1&split=train")
    return tokenize_texts([f"{r['question']}={r['solution']}={r['answer']}" for r in records], tokenizer)


def small_model(seed=0, **overrides):
    return build_latent_thought_model(vocab_size=258, seed=seed, **{**SMALL, **overrides})


def batch_of(dataset, n=8):
    return LatentThoughtCollator(pad_id=0)([dataset[i] for i in range(n)])


def random_latents(model, batch, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *model.config.latent_shape), generator=generator)


# ------------------------------------------------------------------------------------ model


def test_config_round_trips_and_registers_with_auto_config(tmp_path):
    config = LatentThoughtConfig(**SMALL, sliding_window=5, position_embedding="learned", latent_dim=16)
    assert config.latent_shape == (2, 4, 16) and config.num_hidden_layers == 2
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LatentThoughtConfig)
    ignore = {"_name_or_path"}
    assert {k: v for k, v in loaded.to_dict().items() if k not in ignore} == {
        k: v for k, v in config.to_dict().items() if k not in ignore
    }
    with pytest.raises(ValueError, match="position_embedding"):
        LatentThoughtConfig(position_embedding="alibi")


def test_cross_attention_uses_the_latents():
    model = small_model().eval()
    ids = torch.randint(2, 258, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        prior_mean = model(ids).logits
        zero = model(ids, latents=torch.zeros(2, *model.config.latent_shape)).logits
        one = model(ids, latents=random_latents(model, 2, seed=1)).logits
        other = model(ids, latents=random_latents(model, 2, seed=2)).logits
        broadcast = model(ids, latents=random_latents(model, 1, seed=1)).logits
    assert torch.equal(prior_mean, zero)  # latents=None is z = 0
    assert (one - other).abs().max() > 1e-3
    assert (one - zero).abs().max() > 1e-3
    torch.testing.assert_close(broadcast[0], one[0])
    with pytest.raises(ValueError, match="latents must have shape"):
        model(ids, latents=torch.zeros(2, 3, 4, 64))


def test_latent_gradient_reaches_every_layer():
    model = small_model()
    ids = torch.randint(2, 258, (2, 7), generator=torch.Generator().manual_seed(1))
    z = random_latents(model, 2).requires_grad_()
    (grad,) = torch.autograd.grad(model(ids, latents=z, labels=ids).loss, [z])
    assert torch.all(grad.abs().flatten(2).sum(-1) > 0)  # every layer's every latent vector matters


@pytest.mark.parametrize("position_embedding", ["rope", "learned"])
def test_sliding_window_hides_tokens_beyond_the_receptive_field(position_embedding):
    """With window W and L layers, position t sees tokens t − L(W − 1) … t: changing anything earlier
    leaves its logits unchanged; changing a token inside that range changes them; without a window
    the far change is visible."""
    window, layers, length, t = 3, 2, 16, 15
    reach = layers * (window - 1)  # the earliest visible index is t − reach
    windowed = small_model(sliding_window=window, position_embedding=position_embedding).eval()
    full = small_model(position_embedding=position_embedding).eval()
    full.load_state_dict(windowed.state_dict())
    ids = torch.randint(2, 258, (1, length), generator=torch.Generator().manual_seed(2))
    far, near = ids.clone(), ids.clone()
    far[0, : t - reach] = torch.randint(2, 258, (t - reach,), generator=torch.Generator().manual_seed(3))
    near[0, t - reach] = (ids[0, t - reach] + 1) % 256 + 2
    z = random_latents(windowed, 1)
    with torch.no_grad():
        base, changed_far, changed_near = (windowed(x, latents=z).logits[0, t] for x in (ids, far, near))
        full_base, full_far = (full(x, latents=z).logits[0, t] for x in (ids, far))
    torch.testing.assert_close(changed_far, base, rtol=0, atol=1e-6)
    assert (changed_near - base).abs().max() > 1e-4
    assert (full_far - full_base).abs().max() > 1e-4


def test_self_attention_mask_rules():
    padding = torch.tensor([[0, 1, 1, 1, 1]])
    mask = self_attention_mask(padding, query_start=0, num_queries=5, num_keys=5, window=2)[0, 0]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],  # a padding query sees only itself (no empty softmax row)
            [0, 1, 0, 0, 0],  # the padding key is hidden
            [0, 1, 1, 0, 0],
            [0, 0, 1, 1, 0],  # window 2: itself and one token back
            [0, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)
    # decoding one query at index 4 against a cache that kept only the last 2 keys
    cached = self_attention_mask(padding, query_start=4, num_queries=1, num_keys=2, window=2)[0, 0]
    assert torch.equal(cached, torch.tensor([[True, True]]))


@pytest.mark.parametrize("sliding_window", [None, 4])
def test_generate_with_cache_matches_recomputation_and_left_padding(sliding_window):
    model = small_model(seed=1, sliding_window=sliding_window).eval()
    generator = torch.Generator().manual_seed(4)
    long = torch.randint(2, 258, (1, 9), generator=generator)
    short = torch.randint(2, 258, (1, 6), generator=generator)
    z = random_latents(model, 2, seed=5)
    padded = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1)])
    mask = (padded != 0).long()
    mask[0] = 1
    kwargs = {"max_new_tokens": 8, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    cached = model.generate(padded, attention_mask=mask, latents=z, **kwargs)
    recomputed = model.generate(padded, attention_mask=mask, latents=z, use_cache=False, **kwargs)
    alone = model.generate(short, latents=z[1:], **kwargs)
    assert torch.equal(cached, recomputed)
    assert torch.equal(cached[1, 3:], alone[0])
    assert len(set(cached[:, 9:].flatten().tolist())) > 1  # not a degenerate constant decode


def test_save_and_reload_with_auto_classes_generates_the_same_tokens(tmp_path):
    model = small_model(seed=2, sliding_window=6).eval()
    ids = torch.randint(2, 258, (2, 8), generator=torch.Generator().manual_seed(6))
    z = random_latents(model, 2, seed=7)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, LatentThoughtForCausalLM)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    kwargs = {"max_new_tokens": 10, "do_sample": False, "eos_token_id": None}
    assert torch.equal(model.generate(ids, latents=z, **kwargs), loaded.generate(ids, latents=z, **kwargs))


# ------------------------------------------------------------------------------------ fast loop


def test_cosine_step_size_reaches_lr_min_one_step_after_the_last():
    steps = [cosine_step_size(t, 9, 0.3, 0.03) for t in range(11)]
    assert steps[0] == pytest.approx(0.3, abs=1e-15)
    # the reference's schedule: cos(π t/T), so the last step t = 8 is above lr_min, t = 9 is lr_min
    assert steps[8] == pytest.approx(0.03 + 0.135 * (1 + math.cos(8 * math.pi / 9)), abs=1e-15)
    assert steps[8] > 0.038 and steps[9] == steps[10] == 0.03
    assert steps[4] == pytest.approx(0.03 + 0.135 * (1 + math.cos(4 * math.pi / 9)), abs=1e-15)
    assert all(a > b for a, b in zip(steps[:10], steps[1:10]))
    assert (
        cosine_step_size(0, 1, 0.3, 0.03) == pytest.approx(0.3) and cosine_step_size(1, 1, 0.3, 0.03) == 0.03
    )


def test_collator_labels_count_exactly_the_scored_tokens(dataset):
    batch = batch_of(dataset, 6)
    scored = scored_token_mask(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert int((batch["labels"] != -100).sum()) == int(scored.sum())
    assert int((batch["labels"][:, 1:] != -100).sum()) == int(scored.sum())
    lengths = batch["attention_mask"].sum(1)
    assert torch.equal(scored.sum(1), lengths - 1)


@pytest.mark.parametrize("kl_weight", [1.0, 0.0])
def test_fast_loop_decreases_the_per_sequence_nelbo(dataset, kl_weight):
    """Mean NELBO at step 0 > step T/2 > step T, and most sequences improve; with kl_weight 0 the
    objective is the reconstruction alone, so the decoder's dependence on z is what is exploited."""
    model = small_model(seed=3)
    batch = batch_of(dataset, 12)
    steps = 12
    fit = fit_posterior(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        steps,
        kl_weight=kl_weight,
        generator=torch.Generator().manual_seed(0),
    )
    assert fit.nelbo_trace.shape == (steps + 1, 12)
    assert fit.mu.shape == (12, *model.config.latent_shape)
    mean = fit.nelbo_trace.mean(dim=1)
    assert mean[0] > mean[steps // 2] > mean[steps]
    assert (fit.nelbo_trace[-1] < fit.nelbo_trace[0]).float().mean() >= 0.9
    decreases = (mean[1:] <= mean[:-1]).float().mean()
    assert decreases >= 0.8, mean


def test_fast_loop_leaves_the_decoder_bit_identical_without_gradients(dataset):
    model = small_model(seed=4)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    batch = batch_of(dataset, 4)
    fit_posterior(model, batch["input_ids"], batch["attention_mask"], 5)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
        assert p.grad is None, name
    # under gradient accumulation the decoder already holds gradients: they are not added to
    model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
    held = {name: p.grad.clone() for name, p in model.named_parameters()}
    with torch.no_grad():  # also runs (with gradients for μ, log σ²) inside no_grad
        fit_posterior(model, batch["input_ids"], batch["attention_mask"], 3)
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, held[name]), name


def test_fast_loop_under_ddp_triggers_no_reduction(dataset, tmp_path):
    """Through a DDP wrapper (gloo, one rank): the loop leaves no gradients and no pending reduction,
    so the next ordinary forward/backward (the slow step) runs normally."""
    # an in-process vLLM engine started earlier in the session may already own the default group
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        group = dist.new_group(ranks=[0], backend="gloo")
        model = torch.nn.parallel.DistributedDataParallel(small_model(seed=5), process_group=group)
        batch = batch_of(dataset, 4)
        with model.no_sync():
            fit = fit_posterior(model, batch["input_ids"], batch["attention_mask"], 3)
        assert all(p.grad is None for p in model.parameters())
        z = (fit.mu + torch.exp(0.5 * fit.logvar) * torch.randn_like(fit.mu)).detach()
        loss = model(
            batch["input_ids"], attention_mask=batch["attention_mask"], latents=z, labels=batch["labels"]
        ).loss
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
    finally:
        if owns_group:
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------ trainer


def test_trainer_runs_with_gradient_accumulation_and_updates_the_decoder(dataset, tmp_path):
    model = small_model(seed=6)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = cpu_training_args(
        tmp_path, max_steps=5, per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=3e-3, seed=42
    )
    trainer = LatentThoughtTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=dataset.select(range(8)),
        data_collator=LatentThoughtCollator(pad_id=0),
        dual_rate=DualRateConfig(fast_steps=4),
    )
    trainer.train()
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert len(changed) == len(before)  # every decoder tensor moved, cross-attention included
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 5
    for entry in logs:
        assert math.isfinite(entry["loss"])
        # the Trainer loss is the slow step's mean token NLL, normalised over the accumulated batch
        assert entry["loss"] == pytest.approx(entry["latent/nll"], rel=0.05)
        assert entry["latent/nelbo_end"] < entry["latent/nelbo_start"]
        assert entry["latent/nelbo_end"] == pytest.approx(entry["latent/nll"] + entry["latent/kl"], rel=1e-4)
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_loss"] > 0


# ------------------------------------------------------------------------------------ inference


def test_elbo_perplexity_is_the_exponentiated_nelbo_per_token(dataset):
    model = small_model(seed=7)
    result = elbo_perplexity(
        model, dataset.select(range(10)), steps=4, batch_size=4, generator=torch.Generator().manual_seed(0)
    )
    batch = batch_of(dataset, 10)
    assert result.num_sequences == 10
    assert result.num_tokens == int(scored_token_mask(batch["input_ids"], batch["attention_mask"]).sum())
    assert result.nelbo_per_token == pytest.approx(result.nll_per_token + result.kl_per_token)
    assert result.perplexity_upper_bound == pytest.approx(math.exp(result.nelbo_per_token))
    # the reference's convention weighs sequences alike and is a different number (lengths differ)
    assert math.isfinite(result.perplexity_sequence_mean)
    assert result.perplexity_sequence_mean != pytest.approx(result.perplexity_upper_bound, rel=1e-3)
    from_tensors = elbo_perplexity(model, batch["input_ids"], batch["attention_mask"], steps=4)
    assert from_tensors.num_tokens == result.num_tokens
    # one sequence: the two conventions coincide
    one = elbo_perplexity(
        model, dataset.select(range(1)), steps=4, generator=torch.Generator().manual_seed(0)
    )
    assert one.perplexity_sequence_mean == pytest.approx(one.perplexity_upper_bound, rel=1e-9)


def test_generate_with_inference_decodes_each_initialisation(tokenizer):
    model = small_model(seed=8).eval()
    prompts = tokenizer(["12+34=", "7+5="], padding=True, return_tensors="pt")
    config = DualRateConfig(num_inits=3, inference_steps=4)
    out = generate_with_inference(
        model,
        prompts["input_ids"],
        prompts["attention_mask"],
        config=config,
        generator=torch.Generator().manual_seed(0),
        max_new_tokens=5,
        do_sample=False,
        eos_token_id=None,
    )
    width = prompts["input_ids"].shape[1]
    assert out.sequences.shape == (2, 3, width + 5)
    assert out.latents.shape == (2, 3, *model.config.latent_shape)
    assert out.nelbo.shape == (2, 3) and torch.isfinite(out.nelbo).all()
    for b in range(2):
        for k in range(3):
            assert torch.equal(out.sequences[b, k, :width], prompts["input_ids"][b])
    assert not torch.equal(out.latents[0, 0], out.latents[0, 1])  # independent initialisations
    # each continuation is the greedy decode of its own z
    again = model.generate(
        prompts["input_ids"][:1],
        attention_mask=prompts["attention_mask"][:1],
        latents=out.latents[0, 1:2],
        max_new_tokens=5,
        do_sample=False,
        eos_token_id=None,
    )
    assert torch.equal(again[0], out.sequences[0, 1])


def test_kl_of_the_fitted_posterior_is_what_the_trainer_logs(dataset):
    """The fitted q is a proper Gaussian: finite, positive KL; σ grew from its e^{−2.5} start."""
    model = small_model(seed=9)
    batch = batch_of(dataset, 4)
    fit = fit_posterior(model, batch["input_ids"], batch["attention_mask"], 8)
    kl = gaussian_kl_standard_normal(fit.mu, fit.logvar)
    assert torch.all(kl > 0) and torch.isfinite(kl).all()
    assert fit.logvar.mean() > -5.0


# ------------------------------------------------------------------------------------ text, recipe


def test_training_documents_use_the_plain_template():
    records = [
        {"question": "12+34", "solution": "2+4=6,1+3=4", "answer": "46"},
        {"question": "5+7", "solution": "5+7=12,0+0+1=1", "answer": "12"},
        {"question": "1+1", "solution": "1+1=2,0+0=0", "answer": "2"},
    ]
    assert record_text(records[0]) == "Q:12+34\nT:2+4=6,1+3=4\nA:46"
    docs = document_texts(records, examples_per_text=2)
    assert docs == [record_text(records[0]) + "\n" + record_text(records[1]), record_text(records[2])]
    assert document_texts(records) == [record_text(r) for r in records]


def test_checkpoint_builder_saves_model_and_character_tokenizer(tmp_path):
    model, tokenizer = build_latent_thought_checkpoint(tmp_path, seed=3, **SMALL)
    assert model.config.vocab_size == len(tokenizer) and model.config.eos_token_id == tokenizer.eos_token_id
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, LatentThoughtForCausalLM) and loaded.config.latents_per_layer == 4
    with pytest.raises(ValueError, match=r"unknown latent-thought model field\(s\) \['hidden'\]"):
        build_latent_thought_checkpoint(None, hidden=32)


def recipe_dict(**model):
    return {
        "trainer": "latent_thought",
        "model": model or {"latent_thought": {"hidden_size": 32, "num_layers": 1, "num_heads": 1}},
        "data": {"train": "synthetic:addition?digits=2&n=16"},
        "latent_thought": {"fast_steps": 2, "examples_per_text": 2},
        "training": {"output_dir": "x", "max_steps": 1},
    }


def test_recipe_validates_the_latent_thought_model_section():
    recipe = parse_recipe(recipe_dict())
    assert isinstance(recipe.method, DualRateConfig) and recipe.method.examples_per_text == 2
    assert recipe.model.latent_thought["hidden_size"] == 32
    with pytest.raises(
        RecipeError, match=r"'latents_per_layr' in section 'model.latent_thought'.*'latents_per_layer'"
    ):
        parse_recipe(recipe_dict(latent_thought={"latents_per_layr": 4}))
    with pytest.raises(RecipeError, match="one of 'path', 'tiny' and 'latent_thought'"):
        parse_recipe(recipe_dict(tiny="1m", latent_thought={}))
    with pytest.raises(RecipeError, match="must be a mapping"):
        parse_recipe(recipe_dict(latent_thought=[64]))
    raw = recipe_dict()
    raw["latent_thought"]["fast_step"] = 3
    with pytest.raises(RecipeError, match=r"'fast_step' in section 'latent_thought'.*'fast_steps'"):
        parse_recipe(raw)


def test_recipe_builds_the_trainer_and_rejects_a_model_without_latents(tmp_path):
    recipe = parse_recipe(recipe_dict())
    model, tokenizer, path = load_model_and_tokenizer(recipe.model, tmp_path)
    assert isinstance(model, LatentThoughtForCausalLM) and path == str(tmp_path / "init")
    records = load_records(recipe.data.train)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to="none", use_cpu=True, max_steps=1)
    trainer = build_trainer(recipe, model, tokenizer, records, args, [], path)
    assert (
        isinstance(trainer, LatentThoughtTrainer) and len(trainer.train_dataset) == 8
    )  # 16 records, 2 per text
    assert trainer.train_dataset[0]["input_ids"][-1] == tokenizer.eos_token_id
    tiny = parse_recipe(recipe_dict(tiny="1m"))
    qwen, qwen_tokenizer, qwen_path = load_model_and_tokenizer(tiny.model, tmp_path / "tiny")
    with pytest.raises(RecipeError, match="needs a latent-thought model.*Qwen2ForCausalLM"):
        build_trainer(tiny, qwen, qwen_tokenizer, records, args, [], qwen_path)


# ------------------------------------------------------------------------------------ evaluation


def test_few_shot_prompt_and_completion_cut():
    demos = [{"question": "1+2", "solution": "1+2=3", "answer": "3"}]
    prompt = few_shot_prompt(demos, "4+5")
    assert prompt == "Q:1+2\nT:1+2=3\nA:3\nQ:4+5\nT:"
    assert few_shot_prompt([], "4+5") == "Q:4+5\nT:"
    assert first_example("4+5=9\nA:9\nQ:7+1\nT:7+1=8\nA:8") == "4+5=9\nA:9"
    picks = choose_demonstrations([{"question": str(i)} for i in range(10)], count=3, shots=2, seed=1)
    assert [len(p) for p in picks] == [2, 2, 2] and all(p[0] != p[1] for p in picks)
    assert choose_demonstrations(demos, 2, 0) == [[], []]


def test_few_shot_metrics_from_known_decodes(monkeypatch, tokenizer):
    """avg@K, pass@k over z and the lowest-NELBO pick, from decodes fixed by hand."""
    import reasoning.eval.latent_thought as latent_eval

    task = "addition?digits=1"
    questions = [
        {"question": "3+4", "answer": "7", "task": task},
        {"question": "5+5", "answer": "10", "task": task},
    ]
    decodes = [
        ["3+4=7\nA:7\nQ:1+1", "3+4=8\nA:8", "junk", "3+4=7\nA:7"],  # 2 of 4 right
        ["5+5=10\nA:11", "5+5=10\nA:10\nQ:2+2\nT:2+2=4\nA:4", "", "A:1"],  # 1 of 4 right
    ]
    nelbos = [[5.0, 1.0, 9.0, 7.0], [3.0, 2.0, 8.0, 4.0]]  # the lowest picks: wrong, right
    seen = {}

    def fake_decode(model, tokenizer, prompts, **kwargs):
        seen["prompts"] = prompts
        return decodes, nelbos

    monkeypatch.setattr(latent_eval, "decode_prompts", fake_decode)
    demos = [{"question": "1+1", "solution": "1+1=2", "answer": "2"}]
    result = few_shot_accuracy(small_model(), tokenizer, questions, demos, shots=1, num_inits=4)
    assert seen["prompts"][0] == "Q:1+1\nT:1+1=2\nA:2\nQ:3+4\nT:"
    assert result["avg@4"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert result["pass@1"] == pytest.approx(result["avg@4"])
    assert result["pass@4"] == 1.0
    assert result["pass@2"] == pytest.approx(((1 - 1 / 6) + (1 - 3 / 6)) / 2)
    assert result["lowest_nelbo@4"] == 0.5
    assert result["samples"][0]["completions"][0] == "3+4=7\nA:7"


def test_few_shot_accuracy_runs_for_latent_and_autoregressive_models(tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    questions = records_from_spec("addition?digits=1&n=3&seed=2&split=all")
    demos = records_from_spec("addition?digits=1&n=4&seed=3&split=all")
    config = DualRateConfig(num_inits=2, inference_steps=2)
    fitted = few_shot_accuracy(
        small_model(seed=10).eval(), tokenizer, questions, demos, 1, config=config, max_new_tokens=4
    )
    assert fitted["latent_inference"] and fitted["num_inits"] == 2 and fitted["inference_steps"] == 2
    assert {"avg@2", "pass@1", "pass@2", "lowest_nelbo@2"} <= set(fitted)
    assert len(fitted["samples"][0]["completions"]) == 2
    prior = few_shot_accuracy(small_model(seed=10).eval(), tokenizer, questions, demos, 1, infer=False)
    assert not prior["latent_inference"] and prior["num_inits"] == 1 and "lowest_nelbo@1" not in prior
    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=258,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=1,
            num_key_value_heads=1,
            head_dim=32,
            pad_token_id=0,
            eos_token_id=1,
        )
    ).eval()
    ar = few_shot_accuracy(qwen, tokenizer, questions, demos, 2, max_new_tokens=4)
    assert not ar["latent_inference"] and ar["avg@1"] == ar["pass@1"]


def test_token_perplexity_is_the_exact_mean_token_nll(tokenizer):
    model = small_model(seed=11).eval()
    texts = ["Q:1+2\nT:1+2=3\nA:3", "Q:4+4\nT:4+4=8\nA:8\nQ:1+1"]
    out = token_perplexity(model, tokenizer, texts, batch_size=1)
    total, count, per_text = 0.0, 0, []
    for text in texts:
        ids = torch.tensor(
            [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
        )
        with torch.no_grad():
            loss = model(ids, labels=ids).loss  # mean over the ids.shape[1] − 1 targets
        total, count = total + float(loss) * (ids.shape[1] - 1), count + ids.shape[1] - 1
        per_text.append(math.exp(float(loss)))
    assert out["num_tokens"] == count
    assert out["nll_per_token"] == pytest.approx(total / count, rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert out["perplexity_sequence_mean"] == pytest.approx(sum(per_text) / len(per_text), rel=1e-5)
    assert out["perplexity_sequence_mean"] != pytest.approx(out["perplexity"], rel=1e-4)


def test_evaluate_latent_thought_reports_a_bound_and_both_decodes(tokenizer):
    heldout = records_from_spec("addition?digits=1&n=4&seed=4&split=all")
    demos = records_from_spec("addition?digits=1&n=4&seed=5&split=all")
    config = DualRateConfig(fast_steps=2, num_inits=2, examples_per_text=2, shots=1, answer_max_tokens=4)
    out = evaluate_latent_thought(small_model(seed=12).eval(), tokenizer, heldout, demos, config)
    assert out["elbo"]["num_sequences"] == 2 and out["elbo"]["inference_steps"] == 2
    assert out["elbo"]["perplexity_upper_bound"] == pytest.approx(math.exp(out["elbo"]["nelbo_per_token"]))
    assert out["elbo"]["perplexity_sequence_mean"] > 1
    assert out["few_shot"]["latent_inference"] and not out["few_shot_prior_z"]["latent_inference"]
    assert out["few_shot"]["questions"] == 4 and out["few_shot"]["shots"] == 1
