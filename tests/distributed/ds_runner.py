"""DeepSpeed ZeRO on CPU: train a few steps, gather the full weights for the engine, save a checkpoint.

Run under `torchrun --nproc_per_node 2` (DS_ACCELERATOR=cpu, gloo) or in one process:

    python tests/distributed/ds_runner.py OUT MODEL STAGES FAMILY [ZERO3_FAMILIES]

STAGES is a comma-separated list of ZeRO stages run in turn in the same processes (`2,3`), or `none`
(plain data parallelism, the reference). FAMILY is `sft` (transformers.Trainer path) or `grpo` (a
RolloutTrainer with a KL reference: engine sampling, the chunked log-probs through the output head,
weight sync). ZERO3_FAMILIES (comma-separated, from `ZERO3_FAMILIES`) then each train one step under
ZeRO-3 (`none` if STAGES is), written to `OUT/3-<family>/`. For each
stage S, each rank writes `OUT/S/rank<r>.pt` with the log history and the weights streamed by
`iter_full_weights` (the engine-sync path, which gathers ZeRO-3 shards); `OUT/S/final` is
`trainer.save_model` (ZeRO-3: consolidated with `stage3_gather_16bit_weights_on_model_save`).
The optimizer is torch SGD (`zero_allow_untested_optimizer`), so the result can be compared with plain
data parallelism exactly; DeepSpeed's own CPU Adam is not needed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

GLOBAL_BATCH = 8


def zero_config(stage: int) -> dict:
    """A ZeRO config for CPU: fp32, no offload, torch optimizer, 16-bit (here fp32) consolidated saves."""
    config: dict = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage},
    }
    if stage == 3:
        # partition every parameter, as for a real model: below this size ZeRO-3 keeps parameters whole,
        # which would cover all of a tiny model's and hide code that reads a weight outside forward
        config["zero_optimization"].update(
            stage3_gather_16bit_weights_on_model_save=True, stage3_param_persistence_threshold=0
        )
    return config


# trainer families that keep a frozen copy of the policy, read the output head's weight, or keep
# parameters outside the model: each runs one step under ZeRO-3 (`main`'s `zero3_families` argument;
# GRPO with its KL reference runs in the ZeRO-2/3 stages themselves, two steps so that π ≠ π_ref)
ZERO3_FAMILIES = ("bayes", "gflownet", "covrl", "variational_online")


def main(out: str, model_path: str, stages: str, family: str, zero3_families: str = "") -> None:
    for stage in stages.split(","):
        run(Path(out) / stage, model_path, stage, family)
    stage = "3" if stages != "none" else "none"
    for name in filter(None, zero3_families.split(",")):
        run(Path(out) / f"{stage}-{name}", model_path, stage, name, max_steps=1)
    if torch.distributed.is_initialized():  # a clean exit (a rank otherwise aborts at teardown)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def run(out_dir: Path, model_path: str, stage: str, family: str, max_steps: int = 2) -> None:
    from accelerate.state import AcceleratorState
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reasoning.data.datasets import load_records
    from reasoning.rollout import Sampling
    from reasoning.rollout.hf import HFEngine
    from reasoning.rollout.vllm_engine import iter_full_weights
    from reasoning.testing import cpu_training_args

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if stage != "none":
        # a new DeepSpeed plugin per stage: forget the previous accelerator state (not the process group)
        AcceleratorState._reset_state()
    args = cpu_training_args(
        out_dir,
        max_steps=max_steps,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        optim="sgd",
        learning_rate=0.1,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        deepspeed=zero_config(int(stage)) if stage != "none" else None,
    )
    # after the TrainingArguments: with a ZeRO-3 config it makes from_pretrained partition the weights
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    records = load_records("synthetic:addition?digits=3&n=64&seed=3&split=train")
    if family == "sft":
        from reasoning.trainers.sft import make_sft_trainer

        trainer = make_sft_trainer(model, tokenizer, records, args)
    else:
        from reasoning.rewards.verifier import correctness

        def digit_share(completions: list[str], **_) -> list[float]:
            return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]

        trainer_cls, config = rollout_family(family)
        trainer = trainer_cls(
            model=model,
            args=args,
            config=config,
            train_dataset=records,
            processing_class=tokenizer,
            reward_funcs=[correctness, digit_share],
            engine=HFEngine(model=model, tokenizer=tokenizer),
            sampling=Sampling(temperature=1.0, max_tokens=24, seed=0),
        )
    trainer.train()
    heads = getattr(trainer, "heads", None)
    # the engine-sync path: every rank streams (and, under ZeRO-3, gathers) the full tensors
    weights = {
        name: tensor.detach().cpu().clone() for name, tensor in iter_full_weights(trainer.model_wrapped)
    }
    shards = [p.numel() for p in trainer.accelerator.unwrap_model(trainer.model).parameters()]
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "log_history": trainer.state.log_history,
            "weights": weights,
            "partitioned": any(n == 0 for n in shards),
            "world_size": trainer.accelerator.num_processes,
            "deepspeed": trainer.is_deepspeed_enabled,
            "heads": {k: v.detach().clone() for k, v in heads.state_dict().items()} if heads else {},
        },
        out_dir / f"rank{trainer.args.process_index}.pt",
    )
    trainer.save_model(str(out_dir / "final"))


def rollout_family(family: str) -> tuple[type, object]:
    """The trainer class and config of a rollout family's run (`grpo`: dapo; the others as named)."""
    if family == "grpo":  # a KL reference (a frozen copy of the policy; under ZeRO-3 an inference engine)
        from reasoning.trainers.grpo import GRPOConfig, GRPOTrainer

        return GRPOTrainer, GRPOConfig(num_generations=4, loss_type="dapo", beta=0.1)
    if family == "bayes":  # a frozen base a (the starting policy) and one batch-wide Z
        from reasoning.trainers.bayes import BayesConfig, BayesTrainer

        return BayesTrainer, BayesConfig(num_generations=4, divergence="rkl", target="tilt", beta=0.5)
    if family == "gflownet":  # a learned scalar log Z; the product reward scores under the frozen base
        from reasoning.trainers.gflownet import GFlowNetConfig, GFlowNetTrainer

        return GFlowNetTrainer, GFlowNetConfig(
            num_generations=4, loss="tb", log_z="scalar", reward="product", reward_floor=0.01
        )
    if family == "covrl":  # its default `covrl` reward scores the answer through the output head
        from reasoning.trainers.covrl import CoVRLConfig, CoVRLTrainer

        return CoVRLTrainer, CoVRLConfig(num_generations=4)
    if family == "variational_online":  # a trainable posterior q_φ copied from the policy
        from reasoning.trainers.variational_online import OnlineVariationalConfig, OnlineVariationalTrainer

        return OnlineVariationalTrainer, OnlineVariationalConfig(
            num_generations=4, estimator="gml", answer_samples=0, phi_learning_rate=1e-3
        )
    raise ValueError(f"unknown family {family!r}; choose sft, grpo or one of {ZERO3_FAMILIES}")


if __name__ == "__main__":
    main(*sys.argv[1:])
    # Every result is on disk and the process group is gone; DeepSpeed's CPU build can still abort a
    # rank during interpreter teardown ("terminate called without an active exception", a C++ thread
    # left joinable), which would turn a finished run into a failed one. Skip the teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
