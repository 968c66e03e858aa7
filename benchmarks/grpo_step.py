"""One GRPO step, ours vs TRL 1.16, and the floor: workloads W1, W2 and W4 of docs/performance.md.

Each variant runs in its own process and prints one JSON line (the suite, `benchmarks/suite.py`,
alternates the processes so that ours and the peer share the machine's noise):

    python benchmarks/grpo_step.py ours  [--prompts 8 --generations 8 --tokens 128 --steps 3]
    python benchmarks/grpo_step.py trl   [same options]     TRL GRPOTrainer, transformers generate
    python benchmarks/grpo_step.py floor [same options]     raw vLLM + one forward/backward/AdamW
    python benchmarks/grpo_step.py trl-vllm                 why TRL's colocated vLLM does not run here

Workload: a 6.3M-parameter Qwen2 (6 layers, hidden 256, 4 heads of 64, the character tokenizer of
`reasoning.models.tiny`), 3-digit addition prompts, `--prompts` × `--generations` completions of
exactly `--tokens` new tokens (min = max), temperature 1, one optimizer step (AdamW, lr 1e-6,
constant) per generation, loss dapo, β = 0, reward = correctness. Both trainers get the same
`TrainingArguments` fields; after `--warmup` untimed steps each of `--steps` steps is timed.

W4 (`--lengths lognormal`): completion lengths vary as reasoning completions do. Generation k of
every process (warm-up included) uses the same prescribed lengths, `prescribed_lengths(work, k)`: a
seeded stratified draw of a log-normal with median `--median-length` whose `--cap-share` upper tail
is cut at the cap `--tokens` (W4: median 64, 10 % at 512). Every side generates exactly those
lengths: our engine and the floor's raw `LLM.generate` with one request per completion,
`SamplingParams(max_tokens=L, ignore_eos=True)`; TRL's transformers `generate` with a logits
processor that forbids EOS before token L and forces it at L (`ForceLengths`; TRL's completion mask
ends at that EOS, so each completion has L tokens on both sides). The floor trains on exactly the
non-pad tokens: length-bucketed right-padded micro-batches of at most `--max-tokens-per-microbatch`
padded tokens, and packed rows of at most `--pack-tokens` tokens (positions restarting per
sequence); the faster of the two is the floor. Ours trains with `GRPOConfig.max_tokens_per_microbatch =
--ours-max-tokens-per-microbatch` (0: fixed-size padded micro-batches) and `padding_free =
--ours-padding-free`; its result reports the chunks per optimizer step and the tokens they carry.

Per step: total (callback `on_step_begin` -> `on_step_end`), generation, weight sync, log-prob
recomputation (no-grad passes made while building the batch: π_old, π_ref), forward+backward of the
loss, optimizer step, and other (= total − the rest: rewards, collation, logging). Peak memory is
the process's peak resident set (`ru_maxrss`, including the engine's KV cache).

Device (`--device auto`, the default): CUDA when a GPU is visible, else the CPU; every variant trains
and generates there. On a GPU each result also reports `device_memory`: torch's peak allocated and
reserved memory (`torch.cuda.max_memory_allocated` / `max_memory_reserved`, which include vLLM's weights
and KV cache, allocated in this process by torch's allocator) and the device memory in use at the end
(`torch.cuda.mem_get_info`). Not run here: this machine has no GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from statistics import NormalDist

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


@dataclass
class Workload:
    prompts: int = 8
    generations: int = 8
    tokens: int = 128
    micro_batch: int = 64  # completions per forward/backward (gradient accumulation covers the rest)
    steps: int = 3
    warmup: int = 1
    bf16: bool = False  # bf16 for both trainers: training autocast, and generation (see `generation_dtype`)
    learning_rate: float = 1e-6
    seed: int = 0
    attention: str = "sdpa"  # the transformers model's attention kernel, for every variant alike
    device: str = "auto"  # auto (CUDA when a GPU is visible, else the CPU), cpu or cuda
    compile: bool = False  # torch.compile the training model (TrainingArguments.torch_compile), every variant alike
    # fixed: every completion has exactly `tokens` tokens; lognormal: W4's prescribed lengths, capped at `tokens`
    lengths: str = "fixed"
    median_length: int = 64  # lognormal: the median completion length
    cap_share: float = 0.1  # lognormal: the share of completions at the cap (`tokens`)
    max_tokens_per_microbatch: int = 2048  # floor with lognormal lengths: padded tokens per bucketed micro-batch
    pack_tokens: int = 1024  # floor with lognormal lengths: tokens per packed row
    # ours: GRPOConfig.max_tokens_per_microbatch (0: none, fixed-size padded micro-batches) and padding_free
    ours_max_tokens_per_microbatch: int = 0
    ours_padding_free: str = "auto"  # auto, true or false

    @property
    def completions(self) -> int:
        return self.prompts * self.generations

    @property
    def accumulation(self) -> int:
        if self.completions % self.micro_batch and self.micro_batch < self.completions:
            raise ValueError(f"micro_batch {self.micro_batch} must divide {self.completions} completions")
        return max(self.completions // self.micro_batch, 1)


def prescribed_lengths(work: Workload, generation: int) -> list[int]:
    """The completion lengths of generation `generation` (0, 1, ...), one per completion, group by group.

    `fixed`: `tokens` each. `lognormal`: L = min(tokens, max(1, round(median · exp(σ z)))) with σ set so
    that P(L ≥ tokens) = cap_share; z is a stratified draw (one uniform per stratum k/n .. (k+1)/n,
    strata shuffled), seeded by (seed, generation), so every step has nearly the same token count
    and the same share at the cap, and every process draws the same lengths for the same step.
    """
    n = work.completions
    if work.lengths == "fixed":
        return [work.tokens] * n
    if work.lengths != "lognormal":
        raise ValueError(f"lengths {work.lengths!r}: use fixed or lognormal")
    if not 0 < work.cap_share < 0.5 or not 1 <= work.median_length < work.tokens:
        raise ValueError(
            f"lognormal lengths need 0 < cap_share < 0.5 and 1 <= median_length < tokens, got cap_share "
            f"{work.cap_share}, median_length {work.median_length}, tokens {work.tokens}"
        )
    normal = NormalDist()
    sigma = math.log(work.tokens / work.median_length) / normal.inv_cdf(1 - work.cap_share)
    rng = random.Random(f"w4-{work.seed}-{generation}")
    strata = list(range(n))
    rng.shuffle(strata)
    out = []
    for k in strata:
        u = min(max((k + rng.random()) / n, 1e-12), 1 - 1e-12)
        out.append(min(work.tokens, max(1, round(work.median_length * math.exp(sigma * normal.inv_cdf(u))))))
    return out


def step_tokens(work: Workload) -> float:
    """Completion tokens per timed step (the mean over the timed generations)."""
    timed = range(work.warmup, work.warmup + work.steps)
    return statistics.fmean(sum(prescribed_lengths(work, k)) for k in timed)


def build_model(path: str | Path, max_positions: int = 1024):
    """The W1 model: tiny '6m' Qwen2 with 4 heads of 64 (6.3M parameters), saved to `path`."""
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM

    from reasoning.models.tiny import build_char_tokenizer, tiny_config

    tokenizer = build_char_tokenizer(model_max_length=max_positions)
    config = tiny_config("6m", vocab_size=len(tokenizer), max_positions=max_positions)
    config.num_attention_heads = config.num_key_value_heads = 4
    config.head_dim = 64
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=1, pad_token_id=0, do_sample=False)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer


def resolve_device(work: Workload, cuda_available: bool | None = None) -> str:
    """"cuda" or "cpu": the workload's device, `auto` = CUDA when a GPU is visible."""
    import torch

    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if work.device == "auto":
        return "cuda" if cuda else "cpu"
    if work.device not in ("cpu", "cuda"):
        raise ValueError(f"device {work.device!r}: use auto, cpu or cuda")
    if work.device == "cuda" and not cuda:
        raise ValueError("device cuda: no GPU is visible (torch.cuda.is_available() is False); use auto or cpu")
    return work.device


def device_memory(device: str) -> dict:
    """GPU memory of this process (MB) on CUDA: torch's peaks (vLLM's weights and KV cache included)
    and what the device has in use; on the CPU nothing (peak RSS is reported for every variant)."""
    import torch

    if device != "cuda":
        return {"device": device}
    free, total = torch.cuda.mem_get_info()
    return {
        "device": device,
        "gpu_name": torch.cuda.get_device_name(),
        "device_memory": {
            "peak_allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
            "peak_reserved_mb": torch.cuda.max_memory_reserved() / 2**20,
            "in_use_mb": (total - free) / 2**20,
            "total_mb": total / 2**20,
        },
    }


def generation_dtype(work: Workload) -> str:
    """Our vLLM engine's dtype: bf16 when the workload runs in bf16. TRL's `generate` then runs under
    the same bf16 autocast (accelerate wraps the model's own `forward`, which `generate` calls), and the
    floor's raw `LLM.generate` shares our engine, so every generator computes in the same precision."""
    return "bfloat16" if work.bf16 else "float32"


def records(work: Workload):
    from reasoning.data.datasets import load_records

    n = work.prompts * (work.warmup + work.steps + 1)
    return load_records(f"synthetic:addition?digits=3&n={n}&seed={work.seed}&split=train")


def training_args(work: Workload, output_dir: str, cls=None):
    from transformers import TrainingArguments

    cls = cls or TrainingArguments
    return dict(
        output_dir=output_dir,
        max_steps=work.warmup + work.steps,
        per_device_train_batch_size=min(work.micro_batch, work.completions),
        gradient_accumulation_steps=work.accumulation,
        learning_rate=work.learning_rate,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=resolve_device(work) == "cpu",
        bf16=work.bf16,
        torch_compile=work.compile,
        seed=work.seed,
    )


def rss_mb() -> float:
    """Current resident set size (MB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def now() -> tuple[float, float]:
    """(wall clock, this process's CPU time): CPU time is what a loaded machine distorts least.

    On a GPU, queued kernels are waited for first, so that each phase is charged its own GPU work."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter(), time.process_time()


class PhaseClock:
    """Accumulates named wall and CPU durations for the current optimizer step."""

    def __init__(self) -> None:
        self.current: dict[str, float] = {}
        self.current_cpu: dict[str, float] = {}
        self.steps: list[dict[str, float]] = []
        self.cpu_steps: list[dict[str, float]] = []
        self._step_start = self._optimizer_start = (0.0, 0.0)

    def add(self, name: str, start: tuple[float, float]) -> None:
        """Add the time since `start` (from `now()`) to phase `name`."""
        wall, process = now()
        self.current[name] = self.current.get(name, 0.0) + wall - start[0]
        self.current_cpu[name] = self.current_cpu.get(name, 0.0) + process - start[1]

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                clock.current, clock.current_cpu = {}, {}
                clock._step_start = now()

            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                clock._optimizer_start = now()

            def on_optimizer_step(self, args, state, control, **kwargs):
                clock.add("optimizer", clock._optimizer_start)

            def on_step_end(self, args, state, control, **kwargs):
                clock.add("total", clock._step_start)
                clock.steps.append(clock.current)
                clock.cpu_steps.append(clock.current_cpu)

        return Callback()


def timed_subclass(base, clock: PhaseClock, logprob_method: str):
    """`base` with its training step split into prepare (generation + batch) and forward+backward,
    and its no-grad log-prob passes (`logprob_method`) counted while a batch is being prepared."""

    class Timed(base):
        _preparing = False

        def _prepare_inputs(self, inputs):
            start = now()
            Timed._preparing = True
            try:
                return super()._prepare_inputs(inputs)
            finally:
                Timed._preparing = False
                clock.add("prepare", start)

        def training_step(self, *args, **kwargs):
            start = now()
            out = super().training_step(*args, **kwargs)
            clock.add("training_step", start)
            return out

    def logprobs(self, *args, **kwargs):
        if not Timed._preparing:
            return getattr(base, logprob_method)(self, *args, **kwargs)
        start = now()
        out = getattr(base, logprob_method)(self, *args, **kwargs)
        clock.add("logprobs", start)
        return out

    setattr(Timed, logprob_method, logprobs)
    return Timed


def summarise(clock: PhaseClock, work: Workload, extra: dict) -> dict:
    """Per-step phases (forward+backward = training steps − prepare) and their medians."""
    cpu = summarise_steps(clock.cpu_steps, work, {})["steps"]
    return {**summarise_steps(clock.steps, work, extra), "cpu_steps": cpu}


def summarise_steps(steps: list[dict[str, float]], work: Workload, extra: dict) -> dict:
    rows = []
    for step in steps:
        row = {
            "total": step["total"],
            "generation": step.get("generation", 0.0),
            "sync": step.get("sync", 0.0),
            "logprobs": step.get("logprobs", 0.0),
            "forward_backward": step.get("training_step", 0.0) - step.get("prepare", 0.0),
            "optimizer": step.get("optimizer", 0.0),
        }
        row["other"] = row["total"] - sum(v for k, v in row.items() if k != "total")
        rows.append(row)
    timed = rows[work.warmup :]
    tokens = step_tokens(work)
    return {
        "workload": asdict(work),
        "steps": timed,
        "median": {k: statistics.median(r[k] for r in timed) for k in timed[0]},
        "tokens_per_step": tokens,
        "peak_rss_mb": peak_rss_mb(),
        **device_memory(resolve_device(work)),
        **extra,
    }


# --------------------------------------------------------------------------- prescribed lengths (W4)


def prescribed_requests(work: Workload, engine, prompts: list[list[int]], sampling, n: int, seeds, generation: int):
    """One vLLM request per completion: `SamplingParams(max_tokens=L, ignore_eos=True)` with L the
    completion's prescribed length, seeded as our engine seeds the i-th of n samples (seed + i)."""
    from vllm.inputs import TokensPrompt

    lengths = prescribed_lengths(work, generation)
    if len(lengths) != len(prompts) * n:
        raise ValueError(f"{len(prompts)} prompts × {n} completions, but {len(lengths)} prescribed lengths")
    requests, params = [], []
    for p, prompt in enumerate(prompts):
        base = sampling.seed if seeds is None else seeds[p]
        for j in range(n):
            fixed = replace(sampling, max_tokens=lengths[p * n + j], ignore_eos=True)
            params.append(engine.sampling_params(fixed, 1, seed=None if base is None else base + j))
            requests.append(TokensPrompt(prompt_token_ids=list(prompt)))
    return requests, params


def prescribed_engine(work: Workload, *args, **kwargs):
    """Our `VLLMEngine` whose `generate` makes each completion exactly its prescribed length (one
    request per completion; everything else — seeds, log-probs, rollouts — as the engine does)."""
    from reasoning.rollout import Rollout
    from reasoning.rollout.vllm_engine import VLLMEngine, _finish_reason, _sampled_logprobs

    class PrescribedLengths(VLLMEngine):
        generations = 0

        def generate(self, prompt_ids, sampling, n=1, seeds=None):
            requests, params = prescribed_requests(work, self, prompt_ids, sampling, n, seeds, self.generations)
            self.generations += 1
            outputs = self.llm.generate(requests, params, use_tqdm=False)
            groups = []
            for index, prompt in enumerate(prompt_ids):
                group = []
                for output in outputs[index * n : (index + 1) * n]:
                    (sample,) = output.outputs
                    tokens = list(sample.token_ids)
                    group.append(Rollout(
                        prompt_ids=list(prompt), completion_ids=tokens,
                        logprobs=_sampled_logprobs(tokens, sample.logprobs),
                        finish_reason=_finish_reason(sample.finish_reason), text="", prompt_index=index,
                    ))  # fmt: skip
                groups.append(group)
            rollouts = [r for g in groups for r in g]
            for rollout, text in zip(rollouts, self.tokenizer.batch_decode([r.completion_ids for r in rollouts])):
                rollout.text = text
            return groups

    return PrescribedLengths(*args, **kwargs)


class ForceLengths:
    """transformers logits processor: row i's completion ends with EOS at exactly `lengths[i]` tokens
    (EOS forbidden before, forced there), so `generate` makes the prescribed lengths."""

    def __init__(self, lengths: list[int], eos_token_ids: list[int]) -> None:
        import torch

        self.lengths = torch.tensor(lengths)
        self.eos = list(eos_token_ids)
        self.prompt_width: int | None = None

    def __call__(self, input_ids, scores):
        if self.prompt_width is None:
            self.prompt_width = input_ids.shape[1]
        if len(self.lengths) != scores.shape[0]:
            raise ValueError(f"{scores.shape[0]} rows generated, {len(self.lengths)} prescribed lengths")
        produced = input_ids.shape[1] - self.prompt_width
        target = self.lengths.to(scores.device)
        early = (produced < target - 1).nonzero().flatten()
        for eos in self.eos:
            scores[early, eos] = float("-inf")
        last = (produced == target - 1).nonzero().flatten()
        scores[last] = float("-inf")
        scores[last, self.eos[0]] = 0.0
        return scores


def force_generate_lengths(model, work: Workload, eos_token_ids: list[int]) -> None:
    """Make `model.generate` (as TRL calls it) produce the prescribed lengths, generation by generation."""
    from transformers import LogitsProcessorList

    original = model.generate
    calls = [0]

    def generate(*args, **kwargs):
        processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        processors.append(ForceLengths(prescribed_lengths(work, calls[0]), eos_token_ids))
        calls[0] += 1
        return original(*args, logits_processor=processors, **kwargs)

    model.generate = generate


# --------------------------------------------------------------------------- variants


def run_ours(work: Workload) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, TrainingArguments

    from reasoning.rewards.verifier import correctness
    from reasoning.rollout import Sampling
    from reasoning.rollout.vllm_engine import VLLMEngine
    from reasoning.trainers.grpo import GRPOConfig, GRPOTrainer

    path = tempfile.mkdtemp(prefix="bench-ours-")
    _, tokenizer = build_model(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=work.attention)
    kv_gib = max(0.25, 2.5 * work.completions * (work.tokens + 32) * 6 * 2 * 256 * 4 / 2**30)
    engine_kwargs = dict(
        max_model_len=work.tokens + 64, cpu_kv_cache_gib=kv_gib, seed=work.seed, dtype=generation_dtype(work)
    )
    if work.lengths == "fixed":
        engine = VLLMEngine(path, **engine_kwargs)
    else:
        engine = prescribed_engine(work, path, **engine_kwargs)
    setup_rss = rss_mb()
    clock = PhaseClock()
    trainer_class = timed_subclass(GRPOTrainer, clock, "logprobs_without_grad")
    original_generate, original_sync = trainer_class.generate, trainer_class.sync_engine

    mismatches = [0]  # completions whose length is not the prescribed one

    def generate(self, rows):
        self.sync_engine()  # timed separately below
        start = now()
        out = original_generate(self, rows)
        clock.add("generation", start)
        if work.lengths != "fixed":
            made = [len(r.completion_ids) for g in out for r in g]
            expected = prescribed_lengths(work, self.engine.generations - 1)
            mismatches[0] += sum(a != b for a, b in zip(made, expected, strict=True))
        return out

    def sync_engine(self):
        start = now()
        original_sync(self)
        clock.add("sync", start)

    trainer_class.generate, trainer_class.sync_engine = generate, sync_engine
    trainer = trainer_class(
        model=model,
        args=TrainingArguments(**training_args(work, tempfile.mkdtemp(prefix="bench-ours-run-"))),
        config=GRPOConfig(
            num_generations=work.generations,
            loss_type="dapo",
            beta=0.0,
            log_completions=False,
            max_tokens_per_microbatch=work.ours_max_tokens_per_microbatch or None,
            padding_free={"true": True, "false": False}.get(work.ours_padding_free, work.ours_padding_free),
        ),
        train_dataset=records(work),
        processing_class=tokenizer,
        reward_funcs=[correctness],
        engine=engine,
        sampling=Sampling(temperature=1.0, max_tokens=work.tokens, seed=work.seed, ignore_eos=True),
        callbacks=[clock.callback()],
    )
    trainer.train()
    engine.close()
    extra = {"variant": "ours", "setup_rss_mb": setup_rss, "length_mismatches": mismatches[0]}
    if work.ours_max_tokens_per_microbatch:  # the last generation's chunks: how many, and their padded tokens
        chunks = [c for micro in trainer._buffer for c in micro["chunks"]]
        extra["chunks_per_step"] = len(chunks) / (trainer.steps_per_generation // trainer.args.gradient_accumulation_steps)
        extra["padded_tokens_per_step"] = sum(
            c["packed"]["input_ids"].shape[1] if "packed" in c
            else c["completion_ids"].shape[0] * (c["prompt_ids"].shape[1] + c["completion_ids"].shape[1])
            for c in chunks
        ) / (trainer.steps_per_generation // trainer.args.gradient_accumulation_steps)
        extra["padding_free"] = trainer.padding_free
    return summarise(clock, work, extra)


def trl_config(work: Workload, output_dir: str, **overrides):
    import trl

    fields = training_args(work, output_dir)
    fields.update(
        num_generations=work.generations,
        max_completion_length=work.tokens,
        # exactly `tokens` new tokens; prescribed lengths: `force_generate_lengths`
        generation_kwargs={"min_new_tokens": work.tokens} if work.lengths == "fixed" else None,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        loss_type="dapo",
        log_completions=False,
    )
    fields.update(overrides)
    return trl.GRPOConfig(**fields)


def trl_dataset(work: Workload):
    from reasoning.data.templates import PlainTemplate

    template = PlainTemplate()
    return records(work).map(lambda row: {"prompt": template.prior_prompt(row["question"])})


def run_trl(work: Workload) -> dict:
    import torch
    import trl
    from transformers import AutoModelForCausalLM
    from trl.extras import profiling

    from reasoning.rewards.verifier import correctness

    path = tempfile.mkdtemp(prefix="bench-trl-")
    _, tokenizer = build_model(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=work.attention)
    setup_rss = rss_mb()
    clock = PhaseClock()
    trl_phases: dict[str, list[float]] = {}
    original_enter, original_log = profiling.ProfilingContext.__enter__, profiling.ProfilingContext._log_metrics

    def enter(self):
        self._bench_start = now()
        return original_enter(self)

    def log_metrics(self, duration: float) -> None:
        # TRL only reports its profiling timers to wandb / mlflow / trackio: collect them here too
        name = self.name.removeprefix("Timed.")  # TRL prefixes the trainer's class name
        trl_phases.setdefault(name, []).append(duration)
        if name in ("transformers.generate", "vLLM.generate"):
            clock.add("generation", self._bench_start)
        if name == "sync_weights":
            clock.add("sync", self._bench_start)
        original_log(self, duration)

    profiling.ProfilingContext.__enter__ = enter
    profiling.ProfilingContext._log_metrics = log_metrics
    trainer_class = timed_subclass(trl.GRPOTrainer, clock, "_get_per_token_logps_and_entropies")
    trainer = trainer_class(
        model=model,
        reward_funcs=[correctness],
        args=trl_config(work, tempfile.mkdtemp(prefix="bench-trl-run-")),
        train_dataset=trl_dataset(work),
        processing_class=tokenizer,
        callbacks=[clock.callback()],
    )
    mismatches, generations = [0], [0]  # completions whose length is not the prescribed one
    if work.lengths != "fixed":
        force_generate_lengths(model, work, trainer.eos_token_ids)
        original_generate = trainer._generate

        def checked_generate(prompts):
            out = original_generate(prompts)
            expected = prescribed_lengths(work, generations[0])
            generations[0] += 1
            mismatches[0] += sum(len(c) != n for c, n in zip(out[1], expected, strict=True))  # EOS included
            return out

        trainer._generate = checked_generate
    trainer.train()
    steps = work.warmup + work.steps
    phases = {
        name: statistics.median(values[-work.steps * len(values) // steps :] or values)
        for name, values in trl_phases.items()
    }
    extra = {"variant": "trl", "setup_rss_mb": setup_rss, "trl_phases": phases, "length_mismatches": mismatches[0]}
    # whether accelerate wrapped the model's forward (and so TRL's generate) in bf16 autocast
    extra["generate_autocast_bf16"] = bool(trainer.accelerator.native_amp and work.bf16)
    return summarise(clock, work, extra)


def run_trl_vllm(work: Workload) -> dict:
    """TRL's best generation option, colocated vLLM: record whether and how it fails here."""
    import torch
    import trl
    from transformers import AutoModelForCausalLM

    from reasoning.rewards.verifier import correctness

    path = tempfile.mkdtemp(prefix="bench-trl-vllm-")
    _, tokenizer = build_model(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=work.attention)
    work = Workload(**{**asdict(work), "steps": 1, "warmup": 0})
    try:
        trainer = trl.GRPOTrainer(
            model=model,
            reward_funcs=[correctness],
            args=trl_config(
                work,
                tempfile.mkdtemp(prefix="bench-trl-vllm-run-"),
                use_vllm=True,
                vllm_mode="colocate",
                vllm_gpu_memory_utilization=0.3,
                vllm_max_model_length=work.tokens + 64,
            ),
            train_dataset=trl_dataset(work),
            processing_class=tokenizer,
        )
        trainer.train()
    except BaseException as error:  # noqa: BLE001 - the point is to record whatever goes wrong
        where = traceback.extract_tb(error.__traceback__)[-1]
        return {
            "variant": "trl-vllm",
            "runs": False,
            "error": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error) else ''}",
            "raised_at": f"{Path(where.filename).name}:{where.lineno} ({where.name})",
        }
    return {"variant": "trl-vllm", "runs": True, "error": None}


def run_floor(work: Workload) -> dict:
    """transformers generate (before vLLM binds threads), then alternately: our engine's generate,
    raw `LLM.generate` with the same parameters, and one plain forward/backward/AdamW of the batch.
    With prescribed (variable) lengths: `run_floor_prescribed`."""
    if work.lengths != "fixed":
        return run_floor_prescribed(work)
    import torch
    from transformers import AutoModelForCausalLM
    from vllm.inputs import TokensPrompt

    from reasoning.data.templates import PlainTemplate, encode
    from reasoning.rollout import Sampling
    from reasoning.rollout.hf import HFEngine
    from reasoning.rollout.vllm_engine import VLLMEngine

    path = tempfile.mkdtemp(prefix="bench-floor-")
    _, tokenizer = build_model(path)
    device = resolve_device(work)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=work.attention)
    model.to(device)
    template = PlainTemplate()
    prompts = [encode(tokenizer, template.prior_prompt(r["question"])) for r in records(work)][: work.prompts]
    sampling = Sampling(temperature=1.0, max_tokens=work.tokens, seed=work.seed, ignore_eos=True)
    rounds = work.warmup + work.steps
    times: dict[str, list[float]] = {"hf_generate": [], "engine_generate": [], "raw_generate": [], "train": []}
    cpu_times: dict[str, list[float]] = {k: [] for k in times}

    def record(name: str, start: tuple[float, float]) -> None:
        wall, process = now()
        times[name].append(wall - start[0])
        cpu_times[name].append(process - start[1])


    hf = HFEngine(model=model, tokenizer=tokenizer, batch_size=work.completions)
    model.eval()
    for _ in range(rounds):
        start = now()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=work.bf16):  # as TRL's generate runs
            hf.generate(prompts, sampling, work.generations)
        record("hf_generate", start)

    kv_gib = max(0.25, 2.5 * work.completions * (work.tokens + 32) * 6 * 2 * 256 * 4 / 2**30)
    engine = VLLMEngine(
        path, max_model_len=work.tokens + 64, cpu_kv_cache_gib=kv_gib, seed=work.seed, dtype=generation_dtype(work)
    )
    raw_prompts = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    params = engine.sampling_params(sampling, work.generations)
    optimizer = torch.optim.AdamW(model.parameters(), lr=work.learning_rate)
    model.train()
    trained = torch.compile(model) if work.compile else model
    for _ in range(rounds):
        start = now()
        groups = engine.generate(prompts, sampling, work.generations)
        record("engine_generate", start)
        start = now()
        engine.llm.generate(raw_prompts, params, use_tqdm=False)
        record("raw_generate", start)
        rows = [r.prompt_ids + r.completion_ids for g in groups for r in g]
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):  # left padding, as the trainers do
            ids[i, width - len(row) :] = torch.tensor(row, device=device)
            mask[i, width - len(row) :] = 1
        start = now()
        micro = min(work.micro_batch, len(rows))
        with torch.autocast(device, dtype=torch.bfloat16, enabled=work.bf16):
            for lo in range(0, len(rows), micro):
                labels = ids[lo : lo + micro].masked_fill(mask[lo : lo + micro] == 0, -100)
                out = trained(input_ids=ids[lo : lo + micro], attention_mask=mask[lo : lo + micro], labels=labels)
                (out.loss / work.accumulation).backward()
        optimizer.step()
        optimizer.zero_grad()
        record("train", start)
    engine.close()
    medians = {k: statistics.median(v[work.warmup :]) for k, v in times.items()}
    return {
        "variant": "floor",
        "workload": asdict(work),
        "runs": {k: v[work.warmup :] for k, v in times.items()},
        "cpu_runs": {k: v[work.warmup :] for k, v in cpu_times.items()},
        "median": {**medians, "floor": medians["raw_generate"] + medians["train"]},
        "tokens_per_step": work.completions * work.tokens,
        "peak_rss_mb": peak_rss_mb(),
        **device_memory(device),
    }


def run_floor_prescribed(work: Workload) -> dict:
    """The token-exact floor of a variable-length step: raw `LLM.generate` of the prescribed lengths
    (and our engine's generate, alternating), then one forward/backward/AdamW over exactly the
    non-pad tokens, two ways: length-bucketed right-padded micro-batches (`plan_microbatches`, at most
    `max_tokens_per_microbatch` padded tokens each) and packed rows (at most `pack_tokens` tokens,
    positions restarting per sequence, no attention mask: transformers keeps the sequences apart).
    The faster of the two (by median) is `train`."""
    import torch
    from transformers import AutoModelForCausalLM

    from reasoning.data.templates import PlainTemplate, encode
    from reasoning.rollout import Sampling
    from reasoning.trainers.microbatch import plan_microbatches

    path = tempfile.mkdtemp(prefix="bench-floor-")
    _, tokenizer = build_model(path)
    device = resolve_device(work)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=work.attention)
    model.to(device)
    template = PlainTemplate()
    prompts = [encode(tokenizer, template.prior_prompt(r["question"])) for r in records(work)][: work.prompts]
    sampling = Sampling(temperature=1.0, max_tokens=work.tokens, seed=work.seed, ignore_eos=True)
    rounds = work.warmup + work.steps
    keys = ("engine_generate", "raw_generate", "train_bucketed", "train_packed")
    times: dict[str, list[float]] = {k: [] for k in keys}
    cpu_times: dict[str, list[float]] = {k: [] for k in keys}
    padded_tokens: list[int] = []

    def record(name: str, start: tuple[float, float]) -> None:
        wall, process = now()
        times[name].append(wall - start[0])
        cpu_times[name].append(process - start[1])

    kv_gib = max(0.25, 2.5 * work.completions * (work.tokens + 32) * 6 * 2 * 256 * 4 / 2**30)
    engine = prescribed_engine(
        work, path, max_model_len=work.tokens + 64, cpu_kv_cache_gib=kv_gib, seed=work.seed,
        dtype=generation_dtype(work),
    )  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=work.learning_rate)
    model.train()
    trained = torch.compile(model) if work.compile else model

    def backward(ids, labels, tokens: int, total: int, **extra) -> None:
        out = trained(input_ids=ids, labels=labels, use_cache=False, **extra)
        (out.loss * tokens / total).backward()  # token-weighted: the mean over every token of the step

    for generation in range(rounds):
        start = now()
        groups = engine.generate(prompts, sampling, work.generations)
        record("engine_generate", start)
        requests, params = prescribed_requests(work, engine, prompts, sampling, work.generations, None, generation)
        start = now()
        engine.llm.generate(requests, params, use_tqdm=False)
        record("raw_generate", start)
        rows = [r.prompt_ids + r.completion_ids for g in groups for r in g]
        lengths = [len(r) for r in rows]
        total = sum(n - 1 for n in lengths)  # predicted tokens
        for mode in ("bucketed", "packed"):
            packed = mode == "packed"
            budget = work.pack_tokens if packed else work.max_tokens_per_microbatch
            plan = plan_microbatches(lengths, budget, packed=packed)
            start = now()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=work.bf16):
                for micro in plan:
                    if packed:
                        ids = torch.tensor([t for i in micro.indices for t in rows[i]], device=device)[None]
                        positions = torch.cat([torch.arange(lengths[i]) for i in micro.indices])[None].to(device)
                        labels = ids.masked_fill(positions == 0, -100)  # no sequence predicts the next one's start
                        backward(ids, labels, micro.tokens - len(micro.indices), total, position_ids=positions)
                    else:
                        ids = torch.zeros((len(micro.indices), micro.width), dtype=torch.long, device=device)
                        mask = torch.zeros_like(ids)
                        for k, i in enumerate(micro.indices):
                            ids[k, : lengths[i]] = torch.tensor(rows[i], device=device)
                            mask[k, : lengths[i]] = 1
                        labels = ids.masked_fill(mask == 0, -100)
                        backward(ids, labels, micro.tokens - len(micro.indices), total, attention_mask=mask)
            optimizer.step()
            optimizer.zero_grad()
            record(f"train_{mode}", start)
        padded_tokens.append(sum(m.cost for m in plan_microbatches(lengths, work.max_tokens_per_microbatch)))
    engine.close()
    runs = {k: v[work.warmup :] for k, v in times.items()}
    cpu_runs = {k: v[work.warmup :] for k, v in cpu_times.items()}
    fastest = min(("train_bucketed", "train_packed"), key=lambda k: statistics.median(runs[k]))
    runs["train"], cpu_runs["train"] = runs[fastest], cpu_runs[fastest]
    medians = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "variant": "floor",
        "workload": asdict(work),
        "runs": runs,
        "cpu_runs": cpu_runs,
        "train_mode": fastest.removeprefix("train_"),
        "median": {**medians, "floor": medians["raw_generate"] + medians["train"]},
        "tokens_per_step": step_tokens(work),
        "bucketed_padded_tokens": statistics.median(padded_tokens[work.warmup :]),
        "peak_rss_mb": peak_rss_mb(),
        **device_memory(device),
    }


VARIANTS = {"ours": run_ours, "trl": run_trl, "floor": run_floor, "trl-vllm": run_trl_vllm}


def parse(argv: list[str] | None = None) -> tuple[str, Workload]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", choices=sorted(VARIANTS))
    defaults = Workload()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    variant = args.pop("variant")
    return variant, Workload(**args)


def main(argv: list[str] | None = None) -> None:
    variant, work = parse(argv)
    result = VARIANTS[variant](work)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
