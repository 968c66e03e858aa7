"""LoRA policies for every trainer family, from a recipe (`model.lora`) through `reasoning.recipes.run`.

Each family trains two steps with the `hf` engine; then the saved adapter (`final/adapter`) is
reloaded on the base and must reproduce the saved merged model (`final/`), which differs from the
base only in the adapted linear layers (the base is frozen). Trainers that need a reference or base
model (GRPO with β > 0, CoVRL-LaTRO, Bayes, GFlowNet's base prior) get it from `disable_adapter()`.
Last, a reloaded adapter is synced into the colocated vLLM engine, whose log-probs must equal the
merged model's.
"""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from reasoning.models.lora import ADAPTER_DIR, load_lora_policy
from reasoning.recipes import RecipeError, load_recipe, parse_recipe, run
from reasoning.rollout import Sampling

ROOT = Path(__file__).resolve().parents[2]
ADDITION = "synthetic:addition?digits=3&n=64&seed=1&split=train"
COMMON = [
    "--model.lora={r: 4, lora_alpha: 16}",
    "--eval.benchmarks=[]",
    "--eval.before=false",
    "--training.max_steps=2",
    "--training.per_device_train_batch_size=8",
    "--training.gradient_accumulation_steps=1",
    "--training.learning_rate=2e-2",
    '--training.save_strategy="no"',
    "--training.logging_steps=1",
    "--training.disable_tqdm=true",
    "--training.report_to=none",
]
ROLLOUT = [
    "--rollout.engine=hf",
    "--rollout.engine_kwargs={}",
    "--rollout.max_tokens=24",
    f"--data.train={ADDITION}",
]

# family -> (demo recipe, extra overrides); every family's model starts from the trained tiny checkpoint
# except latent_thought (a fresh latent-thought model)
FAMILIES = {
    "sft": ("sft", ["--model.tiny=null", f"--data.train={ADDITION}"]),
    "grpo": (
        "grpo",
        [
            *ROLLOUT,
            "--grpo.num_generations=4",
            "--grpo.beta=0.1",
            "--reward.functions=[correctness, reference_steps]",
            # B ≠ 0 from the start: the policy differs from its base, so the KL to the reference (the
            # adapter-disabled base) is positive and trains the adapter even when all rewards tie
            "--model.lora={r: 4, lora_alpha: 16, init_lora_weights: false}",
        ],
    ),
    "covrl": ("covrl", [*ROLLOUT, "--covrl.num_generations=4", "--covrl.reward=latro"]),
    "bayes": (
        "bayes",
        [
            *ROLLOUT,
            "--bayes.num_generations=4",
            "--bayes.target=tilt",
            "--bayes.beta=1.0",
            "--reward.functions=[reference_steps]",
        ],
    ),
    "gflownet": (
        "gflownet",
        [*ROLLOUT, "--gflownet.num_generations=4", "--gflownet.replay_capacity=4"],
    ),
    "variational_online": (
        "variational_online",
        [*ROLLOUT, "--variational_online.num_generations=4", "--variational_online.answer_samples=2"],
    ),
    "latent_thought": (
        "latent_thought",
        [
            "--model.latent_thought={hidden_size: 64, num_layers: 2, num_heads: 2, intermediate_size: 128, latents_per_layer: 2}",
            "--data.train=synthetic:addition?digits=2&n=64&seed=0&split=train",
            "--latent_thought.fast_steps=2",
            "--latent_thought.heldout=null",
        ],
    ),
    "variational": (
        "variational",
        [
            "--model.tiny=null",
            *ROLLOUT,
            "--variational.num_traces=2",
            "--variational.answer_samples=2",
            "--variational.num_questions=4",
            "--variational.posterior_steps=2",
            "--variational.final_steps=2",
            "--variational.heldout=null",
        ],
    ),
}


def lora_recipe(family: str, tmp_path: Path, base: Path):
    recipe, extra = FAMILIES[family]
    overrides = [*COMMON, *extra, f"--training.output_dir={tmp_path / family}"]
    if family != "latent_thought":
        overrides.append(f"--model.path={base}")
    if family == "variational":
        overrides.append(f"--variational.prior_path={base}")
    return load_recipe(ROOT / "recipes" / "demo" / f"{recipe}.yaml", overrides)


def adapted_linear_names(model: torch.nn.Module) -> set[str]:
    """Weights of the linear layers `all-linear` adapts (every nn.Linear but the output head)."""
    head = model.get_output_embeddings()
    return {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    }


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_policy_trains_saves_and_reloads(family, tmp_path, trained_tiny_dir):
    recipe = lora_recipe(family, tmp_path, trained_tiny_dir)
    run(recipe)
    run_dir = tmp_path / family
    # the variational pipeline's last SFT stage trains the final model (its base: the prior)
    saved = run_dir / "final_sft" / "final" if family == "variational" else run_dir / "final"
    base_path = run_dir / "init" if family == "latent_thought" else trained_tiny_dir
    assert (saved / "config.json").exists() and (saved / ADAPTER_DIR / "adapter_config.json").exists()
    if family == "variational":
        assert (run_dir / "posterior" / "final" / ADAPTER_DIR / "adapter_config.json").exists()
    import reasoning.models.latent_thought  # noqa: F401  (registers the latent thought model with Auto*)

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    merged = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    policy = load_lora_policy(base_path, saved / ADAPTER_DIR, trainable=False).eval()
    ids = AutoTokenizer.from_pretrained(base_path)("Q:347+285\nT:7+5=12,", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.manual_seed(0)
        base_logits = base(ids).logits
        torch.manual_seed(0)
        merged_logits = merged(ids).logits
        torch.manual_seed(0)
        policy_logits = policy(ids).logits
    assert (policy_logits - merged_logits).abs().max() < 1e-4  # adapter reloaded == merged model
    assert (merged_logits - base_logits).abs().max() > 1e-4  # the adapter was trained
    adapted = adapted_linear_names(base)
    base_params = dict(base.named_parameters())
    changed = {n for n, p in merged.named_parameters() if not torch.equal(p, base_params[n])}
    assert changed and changed <= adapted  # only the adapted layers moved: the base was frozen
    if family == "grpo":
        import json

        logs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert all(entry["kl"] > 0 for entry in logs if "kl" in entry) and any("kl" in e for e in logs)


def test_unknown_lora_option_names_the_closest_field():
    raw = {"trainer": "sft", "model": {"tiny": "1m", "lora": {"r": 4, "lora_alfa": 8}}}
    with pytest.raises(
        RecipeError, match="unknown LoRA option 'lora_alfa' in model.lora; did you mean 'lora_alpha'"
    ):
        parse_recipe(raw)


@pytest.mark.vllm
def test_reloaded_adapter_synced_into_vllm_matches_the_merged_model(tmp_path, trained_tiny_dir, vllm_engine):
    """GRPO with LoRA, adapter saved and reloaded, synced into vLLM: log-probs equal the merged model's."""
    run(lora_recipe("grpo", tmp_path, trained_tiny_dir))
    saved = tmp_path / "grpo" / "final"
    policy = load_lora_policy(trained_tiny_dir, saved / ADAPTER_DIR)
    merged = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(trained_tiny_dir)
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in ["Q:12+9\nT:", "Q:604+77\nT:"]]
    try:
        vllm_engine.sync_weights(policy)
        assert all(not m.merged for m in policy.modules() if hasattr(m, "merged") and hasattr(m, "lora_A"))
        for sampling in (
            Sampling(temperature=0, max_tokens=16),
            Sampling(temperature=0.8, max_tokens=16, seed=1),
        ):
            for group in vllm_engine.generate(prompts, sampling, n=1 if sampling.greedy else 2):
                for r in group:
                    ids = torch.tensor([r.prompt_ids + r.completion_ids])
                    with torch.no_grad():
                        logits = merged(ids).logits[0, len(r.prompt_ids) - 1 : -1] / (
                            sampling.temperature or 1.0
                        )
                    expected = torch.log_softmax(logits, -1).gather(
                        -1, torch.tensor(r.completion_ids)[:, None]
                    )
                    assert (expected.squeeze(-1) - torch.tensor(r.logprobs)).abs().max() < 1e-4
    finally:
        # leave the session engine as other tests expect it: the trained tiny model
        vllm_engine.sync_weights(AutoModelForCausalLM.from_pretrained(trained_tiny_dir, dtype=torch.float32))
