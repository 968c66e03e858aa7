"""LoRA policies (PEFT) for every trainer: build from a recipe, save, reload.

A recipe turns LoRA on with `model.lora`, a mapping of `peft.LoraConfig` fields, e.g.
`lora: {r: 16, lora_alpha: 32, target_modules: all-linear}`. The policy is then
W' = W + (α/r)·B·A on the targeted layers, with the base W frozen, and:

- the frozen base is the reference / base model wherever a trainer needs one (GRPO's KL
  reference, the Bayes target's a(x), GFlowNet's likelihood reward, CoVRL-LaTRO's reference):
  the same module run under `disable_adapter()`, so no second copy of the weights;
- rollout engines generate from the merged weights: the vLLM engines merge W + ΔW on the fly while
  streaming (`rollout.vllm_engine.iter_full_weights`), the `hf` engine runs the PEFT model itself;
- `save_trained_policy` writes the merged model (loadable by transformers and vLLM, evaluated by
  `reasoning train`) and, in `adapter/`, the adapter alone (`PeftModel.save_pretrained`), which
  `load_lora_policy(base, adapter_dir)` puts back on the base to resume or continue training.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

import torch

ADAPTER_DIR = "adapter"


def lora_config(options: dict[str, Any]):
    """A `peft.LoraConfig` for a causal LM from recipe options (unknown keys are errors).

    Defaults: `target_modules: all-linear` (every linear layer but the output head), `r: 8`,
    `lora_alpha: 16`, no dropout.
    """
    from peft import LoraConfig, TaskType

    valid = [f.name for f in dataclasses.fields(LoraConfig) if f.init]
    for key in options:
        if key not in valid:
            match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f"; did you mean {match[0]!r}?" if match else " (see peft.LoraConfig for the fields)"
            raise ValueError(f"unknown LoRA option {key!r} in model.lora{hint}")
    values = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear", **options}
    return LoraConfig(task_type=TaskType.CAUSAL_LM, **values)


def apply_lora(model: torch.nn.Module, options: dict[str, Any]) -> torch.nn.Module:
    """Wrap `model` in a PEFT LoRA model (base weights frozen, adapters trainable)."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(options))


def save_trained_policy(trainer, directory: str | Path) -> None:
    """Save a `transformers.Trainer`'s model into `directory`; all ranks call this.

    A plain model is saved as usual (`trainer.save_model`). A PEFT model is saved twice: the adapter
    alone in `directory/adapter` (`trainer.save_model`, which handles DeepSpeed / FSDP state dicts)
    and the merged model W + ΔW in `directory` itself (from `iter_full_weights`, which gathers ZeRO-3
    shards module by module, so every rank takes part), which transformers and vLLM load directly.
    """
    from reasoning.rollout.vllm_engine import iter_full_weights
    from reasoning.trainers.base import is_peft_model

    directory = Path(directory)
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not is_peft_model(model):
        trainer.save_model(str(directory))
        return
    trainer.save_model(str(directory / ADAPTER_DIR))
    keep = trainer.args.should_save
    # copies: ZeRO-3 gathered storage is released after each module
    merged = {name: tensor.detach().clone() for name, tensor in iter_full_weights(model) if keep}
    if keep:
        model.get_base_model().save_pretrained(str(directory), state_dict=merged)


def load_lora_policy(
    base: str | Path | torch.nn.Module,
    adapter_dir: str | Path,
    trainable: bool = True,
    dtype: str = "float32",
) -> torch.nn.Module:
    """The PEFT policy `base` + the adapter saved in `adapter_dir` (`save_trained_policy`'s `adapter/`).

    `base` is the model the adapter was trained on (a loaded model, or its path); `trainable` keeps
    the adapter trainable (to continue training) rather than frozen for inference.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if not isinstance(base, torch.nn.Module):
        base = AutoModelForCausalLM.from_pretrained(str(base), dtype=getattr(torch, dtype))
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)


__all__ = ["ADAPTER_DIR", "apply_lora", "load_lora_policy", "lora_config", "save_trained_policy"]
