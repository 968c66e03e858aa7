"""LoRA policies (PEFT) for every trainer: build from a recipe, save, reload.

A recipe turns LoRA on with `model.lora`, a mapping of `peft.LoraConfig` fields, e.g.
`lora: {r: 16, lora_alpha: 32, target_modules: all-linear}`. The policy is then
W' = W + (α/r)·B·A on the targeted layers, with the base W frozen, and:

- the frozen base is the reference / base model wherever a trainer needs one (GRPO's KL
  reference, the Bayes target's a(x), GFlowNet's likelihood reward, CoVRL-LaTRO's reference):
  the same module run under `disable_adapter()`, so no second copy of the weights;
- rollout engines generate from the merged weights: the vLLM engines merge W + ΔW on the fly while
  streaming (`rollout.vllm_engine.iter_full_weights`), the `hf` engine runs the PEFT model itself;
- `reasoning.trainers.checkpoint.save_trained_policy` writes the merged model (loadable by
  transformers and vLLM, evaluated by `reasoning train`) and, in `adapter/`, the adapter alone
  (`PeftModel.save_pretrained`), which `load_lora_policy(base, adapter_dir)` puts back on the base
  to resume or continue training.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from transformers import AutoModelForCausalLM

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


def is_peft_model(model: torch.nn.Module) -> bool:
    """A PEFT model: its base is the policy with the adapters disabled."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def load_lora_policy(
    base: str | Path | torch.nn.Module,
    adapter_dir: str | Path,
    trainable: bool = True,
    dtype: str = "float32",
) -> torch.nn.Module:
    """The PEFT policy `base` + the adapter saved in `adapter_dir` (`checkpoint.save_trained_policy`'s `adapter/`).

    `base` is the model the adapter was trained on (a loaded model, or its path); `trainable` keeps
    the adapter trainable (to continue training) rather than frozen for inference.
    """
    from peft import PeftModel

    if not isinstance(base, torch.nn.Module):
        base = AutoModelForCausalLM.from_pretrained(str(base), dtype=getattr(torch, dtype))
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)


# --------------------------------------------------------------------------- adapter export


def _peft_model(model: torch.nn.Module) -> torch.nn.Module:
    """`model` without DDP / DeepSpeed / accelerate / compile wrappers; it must be a PEFT model."""
    # accelerate's unwrapping, not the rollout engine's: rollout imports this module (no import cycle)
    model = extract_model_from_parallel(model, keep_torch_compile=False)
    if not (is_peft_model(model) and hasattr(model, "get_base_model")):
        raise ValueError(f"{type(model).__name__} is not a PEFT model: it has no adapter to export")
    return model


def active_adapter_name(model: torch.nn.Module) -> str:
    """The one active adapter of a PEFT model (several active adapters are an error)."""
    model = _peft_model(model)
    active = model.active_adapters if hasattr(model, "active_adapters") else [model.active_adapter]
    if len(active) != 1:
        raise ValueError(f"{len(active)} active adapters ({active}); exactly one can be exported")
    return active[0]


def lora_rank(model: torch.nn.Module) -> int:
    """The largest rank of the active LoRA adapter (`r`, or a larger `rank_pattern` entry)."""
    model = _peft_model(model)
    config = model.peft_config[active_adapter_name(model)]
    return max([int(config.r), *(int(r) for r in (getattr(config, "rank_pattern", None) or {}).values())])


def _json_safe(value: Any) -> Any:
    """PEFT config values as JSON would hold them (sets -> sorted lists, enums -> their values)."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, set | frozenset):
        return sorted(_json_safe(item) for item in value)
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    if hasattr(value, "value") and type(value).__module__.startswith("peft"):  # PeftType, TaskType
        return value.value
    return value


@torch.no_grad()
def adapter_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, config) of the active LoRA adapter, as `save_pretrained` would write them, in memory.

    Tensors are named as in `adapter_model.safetensors` (`base_model.model.<module>.lora_A.weight`,
    `...lora_B.weight`, `...lora_embedding_A/B` for embeddings, the adapter name left out), copied
    to the CPU (a snapshot: later training steps do not change them); the config is the adapter's
    `adapter_config.json` as a dict. Only the adapter moves: a few MB where the model is GBs.
    ZeRO-3 partitioned adapters are refused (gather them first): their local shards are empty.
    """
    model = _peft_model(model)
    adapter = active_adapter_name(model)
    from peft.tuners.lora import LoraLayer

    tensors: dict[str, torch.Tensor] = {}
    for name, module in model.get_base_model().named_modules():
        if not isinstance(module, LoraLayer):
            continue
        pairs = []
        if adapter in module.lora_A:
            pairs = [
                ("lora_A.weight", module.lora_A[adapter].weight),
                ("lora_B.weight", module.lora_B[adapter].weight),
            ]
        elif adapter in getattr(module, "lora_embedding_A", {}):
            pairs = [
                ("lora_embedding_A", module.lora_embedding_A[adapter]),
                ("lora_embedding_B", module.lora_embedding_B[adapter]),
            ]
        for suffix, param in pairs:
            if hasattr(param, "ds_id"):
                raise ValueError(
                    f"{name}.{suffix} is partitioned by DeepSpeed ZeRO-3: gather the adapter before exporting it"
                )
            tensors[f"base_model.model.{name}.{suffix}"] = param.detach().to("cpu", copy=True)
    if not tensors:
        raise ValueError(f"adapter {adapter!r} has no LoRA layers to export")
    config = _json_safe(model.peft_config[adapter].to_dict())
    return tensors, config


__all__ = [
    "ADAPTER_DIR",
    "active_adapter_name",
    "adapter_state",
    "apply_lora",
    "is_peft_model",
    "load_lora_policy",
    "lora_config",
    "lora_rank",
]
