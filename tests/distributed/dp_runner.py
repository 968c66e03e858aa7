"""Trains every trainer family for a few steps from a recipe and saves what the equality test compares.

Run once in one process with the global batch, and once under
`accelerate launch --num_processes 2` (CPU, gloo) with half of it per rank:

    python tests/distributed/dp_runner.py OUT MODEL LATENT_MODEL [FAMILY ...]

Each rank writes `OUT/<family>/rank<r>.pt`: the log history, the trained weights and the state a
trainer keeps outside the model (log Z heads, Ẑ estimates, baselines). The recipes use the `hf`
engine (cheap, and seeded per prompt like vLLM), plain SGD (Adam's first step is lr·sign(g), which
would turn float noise in near-zero gradients into lr-sized differences) and gradient accumulation.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402

# Global sizes: per-rank sizes are these divided by the number of processes.
GLOBAL_BATCH = 8  # completions (or SFT samples) per micro-step, all ranks together
FAMILIES = ("sft", "grpo", "grpo_stale", "covrl", "bayes", "gflownet", "latent_thought")


def family_recipe(family: str, model: str, latent_model: str, out: Path, world: int) -> dict[str, Any]:
    """The raw recipe of one family's run (sizes per rank for `world` processes)."""
    training = {
        "output_dir": str(out / family),
        "max_steps": 2,
        "per_device_train_batch_size": GLOBAL_BATCH // world,
        "gradient_accumulation_steps": 2,
        "optim": "sgd",
        "learning_rate": 0.1,
        "lr_scheduler_type": "constant",
        "weight_decay": 0.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": True,
        "seed": 0,
    }
    rollout = {"engine": "hf", "temperature": 1.0, "max_tokens": 32, "engine_kwargs": {}}
    data = {"train": "synthetic:addition?digits=3&n=64&seed=3&split=train"}
    reward = {"functions": ["correctness"]}  # the runner adds `digit_share` (see run_family)
    common = {"model": {"path": model}, "data": data, "rollout": rollout, "reward": reward}
    if family == "sft":
        return {"trainer": "sft", "model": {"path": model}, "data": data, "training": training}
    if family == "grpo":
        # dapo: the token normaliser counts every rank's tokens; batch scaling: the global std
        return {
            **common,
            "trainer": "grpo",
            "training": training,
            "grpo": {"num_generations": 4, "loss_type": "dapo", "scale_rewards": "batch", "beta": 0.1},
        }
    if family == "grpo_stale":
        # one-step-off rollouts: step 2 trains on rollouts of step 1's weights, importance-weighted
        # (the sync, the read-ahead of each rank's prompts and their seeds must agree across ranks)
        return {
            **common,
            "trainer": "grpo",
            "training": training,
            "grpo": {"num_generations": 4, "loss_type": "dapo", "scale_rewards": "batch", "max_staleness": 1},
        }
    if family == "grpo_budget":
        # token-budget chunks (`max_tokens_per_microbatch`): each rank cuts its own rows, so the ranks' chunk
        # counts differ; grpo normalisation (per-sequence shares), π_ref through the planner too
        return {
            **common,
            "trainer": "grpo",
            "training": training,
            "grpo": {"num_generations": 4, "loss_type": "grpo", "scale_rewards": "batch", "beta": 0.1,
                     "max_tokens_per_microbatch": 130},
        }
    if family == "covrl":
        # per-rollout prior/posterior sources (the mixed path: one seeded request per rollout)
        return {
            **common,
            "trainer": "covrl",
            "training": training,
            "covrl": {
                "num_generations": 4,
                "reward": "covrl",
                "alpha": 0.5,
                "sampling_level": "rollout",
                "scale_advantages": "batch",
                "nll_coef": 0.1,
            },
        }
    if family == "bayes":
        # one Z for the whole batch (pooled over ranks), GDC++ coefficient from global sums
        return {
            **common,
            "trainer": "bayes",
            "training": training,
            "bayes": {
                "num_generations": 4,
                "divergence": "rkl",
                "target": "tilt",
                "beta": 0.5,
                "conditional": False,
                "baseline": "gdc++",
            },
        }
    if family == "gflownet":
        # a learned scalar log Z outside DDP (its gradient is averaged over ranks by the trainer)
        return {
            **common,
            "trainer": "gflownet",
            "training": training,
            "gflownet": {
                "num_generations": 4,
                "loss": "tb",
                "log_z": "scalar",
                "reward": "verifier",
                "reward_floor": 0.01,
                "tempered_probability": 0.5,
                "replay_probability": 0.0,
            },
        }
    if family == "latent_thought":
        return {
            "trainer": "latent_thought",
            "model": {"path": latent_model},
            "data": data,
            "training": {**training, "per_device_train_batch_size": 4 // world},
            "latent_thought": {"fast_steps": 2, "examples_per_text": 2, "max_length": 128},
        }
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


def digit_share(completions: list[str], **_: Any) -> list[float]:
    """A dense reward in [0, 1]: the share of digits in the completion (varies within every group)."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def rollout_trainer_classes() -> dict[str, type]:
    from reasoning.trainers.bayes import BayesTrainer
    from reasoning.trainers.covrl import CoVRLTrainer
    from reasoning.trainers.gflownet import GFlowNetTrainer
    from reasoning.trainers.grpo import GRPOTrainer

    return {"grpo": GRPOTrainer, "covrl": CoVRLTrainer, "bayes": BayesTrainer, "gflownet": GFlowNetTrainer}


def trainer_state(trainer: Any) -> dict[str, torch.Tensor | float]:
    """What a trainer keeps outside the model and must agree across ranks and with one process."""
    state: dict[str, Any] = {}
    heads = getattr(trainer, "heads", None)
    if heads is not None:
        state.update({f"heads.{k}": v.detach().cpu().clone() for k, v in heads.state_dict().items()})
    for key, history in getattr(trainer, "log_z_state", {}).items():
        state[f"log_z[{key}]"] = torch.tensor(history, dtype=torch.float64)
    if getattr(trainer, "baseline_value", None) is not None:
        state["baseline_value"] = float(trainer.baseline_value)
    if hasattr(trainer, "rlpr_threshold"):
        state["rlpr_threshold"] = float(trainer.rlpr_threshold)
    return state


def run_family(family: str, model: str, latent_model: str, out: Path) -> None:
    from reasoning.data.datasets import load_records
    from reasoning.recipes import (
        build_engine,
        build_sampling,
        build_trainer,
        load_model_and_tokenizer,
        parse_recipe,
        training_arguments,
    )
    from reasoning.rewards.verifier import correctness
    from reasoning.rollout.vllm_engine import iter_full_weights

    world = int(os.environ.get("WORLD_SIZE", "1"))
    recipe = parse_recipe(family_recipe(family, model, latent_model, out, world))
    args = training_arguments(recipe)
    policy, tokenizer, path = load_model_and_tokenizer(recipe.model, Path(args.output_dir))
    records = load_records(recipe.data.train)
    if recipe.trainer in ("sft", "latent_thought"):
        trainer = build_trainer(recipe, policy, tokenizer, records, args, [], path)
    else:  # as build_trainer does, with a dense reward (the tiny model rarely gets an answer right)
        trainer = rollout_trainer_classes()[recipe.trainer](
            model=policy,
            args=args,
            config=recipe.method,
            train_dataset=records,
            processing_class=tokenizer,
            reward_funcs=[correctness, digit_share],
            engine=build_engine(recipe, policy, tokenizer, path),
            sampling=build_sampling(recipe, args.seed),
        )
    plans: list[list[int]] = []  # token-budget runs: rows per chunk of every micro-step, in order
    if getattr(getattr(trainer, "config", None), "max_tokens_per_microbatch", None):
        plan = trainer.token_budget_micro_batches

        def recorded(batch, order):
            micro_steps = plan(batch, order)
            plans.extend([len(c["completion_ids"]) for c in m["chunks"]] for m in micro_steps)
            return micro_steps

        trainer.token_budget_micro_batches = recorded
    trainer.train()
    # the engine-sync path: full tensors under checkpoint names (tied lm_head included)
    weights = {k: v.detach().cpu().clone() for k, v in iter_full_weights(trainer.model_wrapped)}
    result = {
        "log_history": trainer.state.log_history,
        "weights": weights,
        "state": trainer_state(trainer),
        "world_size": trainer.accelerator.num_processes,
        "chunks": plans,
    }
    folder = out / family
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(result, folder / f"rank{trainer.args.process_index}.pt")
    engine = getattr(trainer, "engine", None)
    if engine is not None:
        engine.close()


def main(argv: list[str]) -> None:
    out, model, latent_model, *families = argv
    for family in families or FAMILIES:
        run_family(family, model, latent_model, Path(out))


if __name__ == "__main__":
    main(sys.argv[1:])
