"""One GRPO step, ours vs TRL 1.16, and the floor: workloads W1 and W2 of docs/performance.md.

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
import os
import resource
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

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

    @property
    def completions(self) -> int:
        return self.prompts * self.generations

    @property
    def accumulation(self) -> int:
        if self.completions % self.micro_batch and self.micro_batch < self.completions:
            raise ValueError(f"micro_batch {self.micro_batch} must divide {self.completions} completions")
        return max(self.completions // self.micro_batch, 1)


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
    tokens = work.completions * work.tokens
    return {
        "workload": asdict(work),
        "steps": timed,
        "median": {k: statistics.median(r[k] for r in timed) for k in timed[0]},
        "tokens_per_step": tokens,
        "peak_rss_mb": peak_rss_mb(),
        **device_memory(resolve_device(work)),
        **extra,
    }


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
    engine = VLLMEngine(
        path, max_model_len=work.tokens + 64, cpu_kv_cache_gib=kv_gib, seed=work.seed, dtype=generation_dtype(work)
    )
    setup_rss = rss_mb()
    clock = PhaseClock()
    trainer_class = timed_subclass(GRPOTrainer, clock, "logprobs_without_grad")
    original_generate, original_sync = trainer_class.generate, trainer_class.sync_engine

    def generate(self, rows):
        self.sync_engine()  # timed separately below
        start = now()
        out = original_generate(self, rows)
        clock.add("generation", start)
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
            num_generations=work.generations, loss_type="dapo", beta=0.0, log_completions=False
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
    return summarise(clock, work, {"variant": "ours", "setup_rss_mb": setup_rss})


def trl_config(work: Workload, output_dir: str, **overrides):
    import trl

    fields = training_args(work, output_dir)
    fields.update(
        num_generations=work.generations,
        max_completion_length=work.tokens,
        generation_kwargs={"min_new_tokens": work.tokens},  # exactly `tokens` new tokens
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
    trainer.train()
    steps = work.warmup + work.steps
    phases = {
        name: statistics.median(values[-work.steps * len(values) // steps :] or values)
        for name, values in trl_phases.items()
    }
    extra = {"variant": "trl", "setup_rss_mb": setup_rss, "trl_phases": phases}
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
    raw `LLM.generate` with the same parameters, and one plain forward/backward/AdamW of the batch."""
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
