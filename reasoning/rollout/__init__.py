"""Rollout engines: one interface (`generate`, `sync_weights`), three backends.

`make_engine("hf" | "vllm" | "vllm-server", model_path, **kw)` builds one. The vLLM backends
import vLLM (and the server one httpx) only when chosen; the hf one needs nothing beyond transformers.
"""

from __future__ import annotations

from reasoning.rollout.base import Rollout, RolloutEngine, Sampling, context_length
from reasoning.rollout.hf import HFEngine

ENGINE_KINDS = ("hf", "vllm", "vllm-server")


def make_engine(kind: str, model_path: str, **kw) -> RolloutEngine:
    """Build the rollout engine `kind` for the checkpoint at `model_path`.

    `hf`: transformers `generate` (reference, works everywhere; `device=` default: the accelerator
    accelerate chose, else CUDA if available, else CPU -- `hf.choose_device`). `vllm`: vLLM in this
    process (colocated with training; `max_model_len=` default: the model's context).
    `vllm-server`: remote `vllm serve` processes over HTTP (their own `--max-model-len`).
    """
    if kind == "hf":
        return HFEngine(model_path, **kw)
    if kind == "vllm":
        from reasoning.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, **kw)
    if kind == "vllm-server":
        from reasoning.rollout.vllm_server import VLLMServerEngine

        return VLLMServerEngine(model_path, **kw)
    raise ValueError(f"unknown rollout engine {kind!r}; choose one of {', '.join(ENGINE_KINDS)}")


__all__ = ["ENGINE_KINDS", "Rollout", "RolloutEngine", "Sampling", "context_length", "make_engine"]
