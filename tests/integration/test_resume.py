"""Kill -9 `reasoning train` at chosen steps, resume, and compare with an uninterrupted run.

For every trainer family a short run (tiny model, transformers rollouts, a checkpoint every step)
is trained once without interruption and once with SIGKILLs: the process kills itself (a real
`SIGKILL`, no cleanup) at a point drawn from a seeded generator — after an optimizer step before
its checkpoint (`step`), in the middle of writing a checkpoint (`save`: weights and optimizer
written, RNG state, trainer state and completion marker not), just before the final model is
written (`end`: the last checkpoint reached max_steps), or, for the variational pipeline, after a
stage's work and before its DONE marker (`stage`). After each kill the same command is run again
and resumes from the latest complete checkpoint. The final weights (and the last checkpoint's
trainer state: replay buffer, log Z, running estimates) must equal the uninterrupted run's within
1e-6 (they are equal bit for bit on CPU).

Runs are children of one fork server that imported torch, transformers and the package once, so a
run costs its training and not the ~5 s interpreter start-up (`RESUME_FORK=0`: every run is a new
`python -c` process instead). `RESUME_KILLS=5` kills five times per family (default: 2 per family,
5 for grpo and gflownet; each followed by the `end` kill); `RESUME_SEED` changes the drawn points.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reasoning.trainers.checkpoint import (
    COMPLETE_MARKER,
    EXTRA_STATE,
    latest_complete_checkpoint,
    load_state_file,
)

ROOT = Path(__file__).resolve().parents[2]
KILLS = int(os.environ.get("RESUME_KILLS", "0"))  # 0: the default schedule (2 or 5 per family)
SEED = int(os.environ.get("RESUME_SEED", "0"))
FORK = os.environ.get("RESUME_FORK", "1") != "0"
TOLERANCE = 1e-6

# The child side: installs the self-kill and runs the real `reasoning` command line.
CHILD = r'''
import importlib, json, os, signal, sys, traceback

REPLY = os.fdopen(os.dup(1), "w")  # the fork server's answers; anything printed goes to stderr
os.dup2(2, 1)

import transformers
import transformers.trainer_callback

import reasoning.cli
import reasoning.recipes  # imports every trainer module (reasoning.recipes.table)
import reasoning.trainers.variational

# what a run imports lazily (a forked child would import it again every time)
for name in [
    "deepspeed", "matplotlib.pyplot", "pydantic", "einops", "rich.progress", "torch.profiler",
    "transformers.models.qwen2.modeling_qwen2", "reasoning.models.tiny", "reasoning.models.latent_thought",
    "reasoning.data.datasets", "reasoning.eval.evaluate", "reasoning.rollout.hf",
]:
    try:
        importlib.import_module(name)
    except ImportError:
        pass


def install_kill(kind, at):
    """SIGKILL this process at the `at`-th event of `kind` (counted in this process)."""
    count = [0]

    def hit():
        count[0] += 1
        if count[0] == at:
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    def before(owner, name, when=lambda *a, **k: True):
        original = getattr(owner, name)

        def patched(*args, **kwargs):
            if when(*args, **kwargs):
                hit()
            return original(*args, **kwargs)

        setattr(owner, name, patched)

    if kind == "step":  # after the optimizer step, before its checkpoint is saved
        original = transformers.trainer_callback.CallbackHandler.on_step_end

        def on_step_end(self, *args, **kwargs):
            control = original(self, *args, **kwargs)
            hit()
            return control

        transformers.trainer_callback.CallbackHandler.on_step_end = on_step_end
    elif kind == "save":  # inside a checkpoint save: weights, optimizer, scheduler written; the rest not
        before(transformers.Trainer, "_save_rng_state")
    elif kind == "end":  # writing a final model (not a checkpoint's)
        before(transformers.Trainer, "save_model", lambda self, *a, _internal_call=False, **k: not _internal_call)
    elif kind == "stage":  # a pipeline stage's work done, its DONE marker not yet written
        before(reasoning.trainers.variational.VariationalReasoningPipeline, "_finish")
    else:
        raise ValueError(kind)


def child(args, kill, log):
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if kill:
        install_kill(kill["kind"], kill["at"])
    sys.argv = ["reasoning", *args]
    code = 0
    try:
        reasoning.cli.app(prog_name="reasoning")
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve():
    """One command per stdin line ({args, kill, log}); each runs in a forked child; replies its status."""
    for line in sys.stdin:
        command = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(command["args"], command["kill"], command["log"])
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), file=REPLY, flush=True)


if sys.argv[1] == "serve":
    serve()
else:
    command = json.loads(sys.argv[1])
    child(command["args"], command["kill"], command["log"])
'''

ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


class Runner:
    """Runs `reasoning` commands as child processes, optionally killed with SIGKILL at an event."""

    def __init__(self, fork: bool) -> None:
        self.server = None
        if fork:
            self.server = subprocess.Popen(
                [sys.executable, "-c", CHILD, "serve"],
                cwd=ROOT,
                env=ENV,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )

    def run(self, args: list[str], log: Path, kill: dict | None = None) -> int:
        command = {"args": args, "kill": kill, "log": str(log)}
        if self.server is None:
            done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(command)], cwd=ROOT, env=ENV)
            return done.returncode
        self.server.stdin.write(json.dumps(command) + "\n")
        self.server.stdin.flush()
        reply = self.server.stdout.readline()
        if not reply:
            raise RuntimeError(f"the fork server died (exit {self.server.poll()})")
        return json.loads(reply)["returncode"]

    def close(self) -> None:
        if self.server is not None:
            self.server.stdin.close()
            self.server.wait(timeout=60)


@pytest.fixture(scope="module")
def runner():
    runner = Runner(FORK)
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def warm(runner, tmp_path_factory) -> Path:
    """A briefly fine-tuned tiny model (`WARM_UP`) for the families whose rewards need finished traces."""
    run_dir = tmp_path_factory.mktemp("warm")
    log = run_dir / "run.log"
    assert runner.run([*WARM_UP, "--training.output_dir", str(run_dir)], log) == 0, log_tail(log)
    return run_dir / "final"


COMMON = [
    "--training.max_steps", "6",
    "--training.save_steps", "1",
    "--training.save_total_limit", "2",
    "--training.logging_steps", "1",
    "--training.disable_tqdm", "true",
    "--training.seed", "0",
    "--eval.benchmarks", "[]",
]  # fmt: skip
ROLLOUT = [
    "--model.path", "null",
    "--model.tiny", "1m",
    "--rollout.engine", "hf",
    "--rollout.max_tokens", "16",
    "--rollout.engine_kwargs", "{}",
    "--eval.before", "false",
    "--training.per_device_train_batch_size", "4",
    "--training.learning_rate", "1e-3",
]  # fmt: skip


@dataclass
class Family:
    recipe: str
    overrides: list[str]
    kills: int  # default number of kills
    steps: int = 6  # optimizer steps of a `reasoning train` run (None: the pipeline)

    def args(self, run_dir: Path, warm: Path) -> list[str]:
        overrides = [value.replace("{warm}", str(warm)) for value in self.overrides]
        return ["train", self.recipe, *COMMON, *overrides, "--training.output_dir", str(run_dir)]


# 12 SFT steps on one-digit addition: completions end (EOS) within 16 tokens about 60 % of the time and
# sometimes carry the answer marker, where an untrained model's almost never do (1 token in 258)
WARM_UP = [
    "train", "recipes/demo/sft.yaml", "--training.max_steps", "12", "--training.save_steps", "100000",
    "--training.per_device_train_batch_size", "16", "--training.warmup_steps", "2", "--sft.max_length", "64",
    "--data.train", "synthetic:addition?digits=1&n=512&seed=0&split=train", "--training.disable_tqdm", "true",
    "--eval.benchmarks", "[]",
]  # fmt: skip


FAMILIES = {
    # 32 records / 8 per step: the run crosses an epoch boundary (reshuffled by seed + epoch)
    "sft": Family(
        "recipes/demo/sft.yaml",
        ["--data.train", "synthetic:addition?digits=2&n=32&seed=0&split=train", "--sft.max_length", "64",
         "--training.per_device_train_batch_size", "8", "--training.warmup_steps", "1"],
        kills=2,
    ),
    # a generation serves 2 micro-steps and 2 passes (4 optimizer steps): most checkpoints fall inside a
    # generation cycle, where the buffer is saved. RFT with threshold 0 keeps every sample (a model this
    # small is never right, so group-normalised advantages would all be 0).
    "grpo": Family(
        "recipes/demo/grpo.yaml",
        [*ROLLOUT, "--model.tiny", "null", "--model.path", "{warm}",
         "--data.train", "synthetic:addition?digits=1&n=4&seed=1&split=train",
         "--grpo.num_generations", "4", "--grpo.steps_per_generation", "2", "--grpo.num_iterations", "2",
         "--grpo.loss_type", "rft", "--grpo.rft_threshold", "0.0"],
        kills=5,
    ),
    # one-step-off rollouts (max_staleness 1): a generation serves 2 passes (2 optimizer steps) and the next
    # one is sampled at the start of the second, so the even checkpoints hold a generation ahead (saved with
    # it) and the odd ones the buffer; 2 prompts make 2 generations an epoch, so the third is read ahead
    # across the epoch boundary. The hf engine samples in the trainer's thread (reasoning/trainers/async_rollouts.py).
    # The default draw resumes from checkpoints 0, 2 (a generation ahead) and 3 (a buffer).
    "grpo_stale": Family(
        "recipes/demo/grpo.yaml",
        [*ROLLOUT, "--model.tiny", "null", "--model.path", "{warm}",
         "--data.train", "synthetic:addition?digits=1&n=2&seed=1&split=train",
         "--grpo.num_generations", "4", "--grpo.num_iterations", "2",
         "--grpo.loss_type", "rft", "--grpo.rft_threshold", "0.0", "--grpo.max_staleness", "1"],
        kills=3,
    ),
    # the same with token-budget chunks packed into rows (the buffer holds several chunks per micro-step,
    # each with its packed layout) and 2 micro-steps per optimizer step
    "grpo_budget": Family(
        "recipes/demo/grpo.yaml",
        [*ROLLOUT, "--model.tiny", "null", "--model.path", "{warm}",
         "--data.train", "synthetic:addition?digits=1&n=4&seed=1&split=train",
         "--grpo.num_generations", "4", "--grpo.steps_per_generation", "2", "--grpo.num_iterations", "2",
         "--grpo.loss_type", "rft", "--grpo.rft_threshold", "0.0", "--training.gradient_accumulation_steps", "2",
         "--grpo.max_tokens_per_microbatch", "40", "--grpo.padding_free", "true"],
        kills=2,
    ),
    # trajectory balance with a learned scalar log Z, replay and tempered exploration; rewards vary
    # through the illegal-character penalty
    "gflownet": Family(
        "recipes/demo/gflownet.yaml",
        [*ROLLOUT, "--data.train", "synthetic:countdown?n_numbers=3&max_number=9&max_target=30&n=8&seed=1&split=train",
         "--gflownet.num_generations", "2", "--gflownet.steps_per_generation", "2", "--gflownet.loss", "tb",
         "--gflownet.log_z", "scalar", "--gflownet.replay_probability", "0.4",
         "--gflownet.tempered_probability", "0.3", "--gflownet.replay_capacity", "4"],
        kills=5,
    ),
    # the reference answer's likelihood after each finished trace is the reward; 2 passes per generation
    "covrl": Family(
        "recipes/demo/covrl.yaml",
        [*ROLLOUT, "--model.tiny", "null", "--model.path", "{warm}",
         "--data.train", "synthetic:addition?digits=1&n=8&seed=1&split=train",
         "--covrl.num_generations", "2", "--covrl.num_iterations", "2"],
        kills=2,
    ),
    # forward KL to the tilted base (r = 0: the base itself) with an offline proposal that is replaced
    # every 2 generations when π is better (its snapshot is checkpoint state), running Z estimates
    "bayes": Family(
        "recipes/demo/bayes.yaml",
        [*ROLLOUT, "--data.train", "synthetic:countdown?n_numbers=3&max_number=9&max_target=30&n=8&seed=1&split=train",
         "--bayes.num_generations", "2", "--bayes.target", "tilt", "--bayes.baseline", "none",
         "--bayes.proposal", "offline", "--bayes.proposal_update_every", "2",
         "--training.gradient_accumulation_steps", "2"],
        kills=2,
    ),
    "latent_thought": Family(
        "recipes/demo/latent_thought.yaml",
        ["--model.latent_thought",
         "{hidden_size: 32, num_layers: 1, num_heads: 1, intermediate_size: 64, latents_per_layer: 2}",
         "--data.train", "synthetic:addition?digits=2&n=48&seed=0&split=train",
         "--latent_thought.fast_steps", "2", "--latent_thought.heldout", "null",
         "--training.per_device_train_batch_size", "4", "--training.warmup_steps", "1"],
        kills=2,
    ),
    # prior SFT, posterior SFT, samples, scores, accuracy, weights, final SFT: 3 SFT steps each
    "variational": Family(
        "recipes/demo/variational.yaml",
        ["--data.train", "synthetic:addition?digits=2&n=16&seed=0&split=train",
         "--rollout.engine", "hf", "--rollout.max_tokens", "16", "--rollout.engine_kwargs", "{}",
         "--variational.prior_steps", "3", "--variational.posterior_steps", "3",
         "--variational.final_steps", "3", "--variational.num_questions", "4",
         "--variational.num_traces", "2", "--variational.answer_samples", "2",
         "--variational.answer_max_tokens", "4", "--variational.heldout", "null",
         "--variational.max_length", "64", "--variational.scoring_batch_size", "8",
         "--training.per_device_train_batch_size", "8", "--training.warmup_steps", "1"],
        kills=2,
        steps=0,
    ),
}  # fmt: skip


def kill_schedule(family: str, spec: Family, count: int) -> list[dict]:
    """`count` kill points seeded by (RESUME_SEED, family), then `end` (after the checkpoint of the
    last step, before the final model). For `reasoning train` runs they are absolute steps (turned
    into per-process counts at launch); for the pipeline, per-process event counts chosen so that
    each falls inside the work left after the kills before it."""
    rng = random.Random(f"{SEED}-{family}")
    end = {"kind": "end", "at": 1}
    if spec.steps == 0:
        # events of one pipeline process: 3 SFT steps and saves in each of prior, posterior and
        # final_sft; stages prior, posterior, samples, scores, accuracy, weights, final_sft
        pool = [
            {"kind": "step", "at": rng.randint(1, 3)},  # inside prior SFT
            {"kind": "stage", "at": rng.randint(1, 2)},  # prior or posterior done, no DONE marker
            {"kind": "save", "at": rng.randint(1, 3)},  # a checkpoint of posterior or final SFT
            {"kind": "stage", "at": 1},  # the stage that was being saved
            end,  # an SFT stage's final model
        ]
        return pool[:count] + [end]
    steps = sorted(rng.randint(1, spec.steps) for _ in range(count))
    return [{"kind": rng.choice(["step", "save"]), "step": s} for s in steps] + [end]


def completed_step(run_dir: Path) -> int:
    latest = latest_complete_checkpoint(run_dir)
    return int(latest.rsplit("-", 1)[-1]) if latest else 0


def assert_close(reference: dict, resumed: dict, what: str) -> float:
    """Max |difference| of two nested states (tensors within TOLERANCE, everything else equal)."""
    if isinstance(reference, torch.Tensor):
        assert resumed.shape == reference.shape, what
        if not reference.is_floating_point():
            assert torch.equal(reference, resumed), what
            return 0.0
        diff = (reference.double() - resumed.double()).abs().max().item() if reference.numel() else 0.0
        assert diff <= TOLERANCE, f"{what}: max |difference| {diff:.3g}"
        return diff
    if isinstance(reference, dict):
        assert reference.keys() == resumed.keys(), what
        return max([assert_close(reference[k], resumed[k], f"{what}[{k!r}]") for k in reference], default=0.0)
    if isinstance(reference, (list, tuple)):
        assert len(reference) == len(resumed), what
        return max(
            [assert_close(a, b, f"{what}[{i}]") for i, (a, b) in enumerate(zip(reference, resumed))],
            default=0.0,
        )
    assert reference == resumed or (reference != reference and resumed != resumed), (
        f"{what}: {reference!r} != {resumed!r}"
    )
    return 0.0


def log_tail(log: Path) -> str:
    return log.read_text()[-3000:] if log.exists() else "(no log)"


def run_family(family: str, runner: Runner, warm: Path, tmp_path: Path, kills: int) -> dict:
    spec = FAMILIES[family]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    log = tmp_path / "runs.log"
    assert runner.run(spec.args(reference, warm), log) == 0, log_tail(log)

    record = []
    for kill in kill_schedule(family, spec, kills):
        if "step" in kill:  # absolute step -> the how-many-th event of this process
            kill = {"kind": kill["kind"], "at": max(kill["step"] - completed_step(killed), 1)}
        code = runner.run(spec.args(killed, warm), log, kill)
        assert code == -signal.SIGKILL, f"kill {kill} did not happen (exit {code}):\n{log_tail(log)}"
        partial = [p.name for p in killed.glob("checkpoint-*") if not (p / COMPLETE_MARKER).exists()]
        if kill["kind"] == "save" and spec.steps:  # the step being saved: written in part, not marked
            assert f"checkpoint-{completed_step(killed) + 1}" in partial, partial
        assert not (killed / "final" / "config.json").exists()
        record.append({**kill, "resumes_from": completed_step(killed), "incomplete": partial})
    assert runner.run(spec.args(killed, warm), log) == 0, log_tail(log)

    final = "final/model.safetensors"
    ref_weights, weights = load_file(reference / final), load_file(killed / final)
    difference = assert_close(ref_weights, weights, f"{family} final weights")
    # the runs trained (a comparison of unchanged weights would prove nothing)
    init = reference / "init" if (reference / "init").exists() else warm
    start = load_file(init / "model.safetensors")
    moved = max((ref_weights[k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-4, f"{family}: training did not change the weights ({moved:.3g})"
    if spec.steps:
        last = f"checkpoint-{spec.steps}"
        ref_state = load_state_file(reference / last / EXTRA_STATE.format(rank=0))
        state = load_state_file(killed / last / EXTRA_STATE.format(rank=0))
        assert_close(ref_state, state, f"{family} trainer state")
        state_keys = sorted(ref_state["extra"])
        assert_same_logs(reference, killed, family)
    else:
        state_keys = []
    return {"kills": record, "max_weight_difference": difference, "extra_state": state_keys}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def assert_same_logs(reference: Path, killed: Path, family: str) -> None:
    """The killed-and-resumed run's metrics.jsonl and completions.jsonl hold each step once, as the
    uninterrupted run's do: the steps an interrupted run logged after its checkpoint are replaced by
    the resumed run's, not repeated. Losses agree (logged rounded to 4 digits)."""
    ref_metrics, metrics = read_jsonl(reference / "metrics.jsonl"), read_jsonl(killed / "metrics.jsonl")
    shape = [(r["step"], "train_runtime" in r) for r in ref_metrics]
    assert len(shape) > 1, f"{family}: the reference run logged {shape}"
    assert [(r["step"], "train_runtime" in r) for r in metrics] == shape, f"{family}: metrics.jsonl steps"
    for ref, got in zip(ref_metrics, metrics):
        if "loss" in ref:
            assert abs(ref["loss"] - got["loss"]) <= 2e-4, f"{family} step {ref['step']}: loss {got} vs {ref}"
    times = [r["time"] for r in metrics]
    assert times == sorted(times), f"{family}: metrics.jsonl time goes back after a resume: {times}"
    ref_completions = read_jsonl(reference / "completions.jsonl")
    completions = read_jsonl(killed / "completions.jsonl")
    assert [r["step"] for r in completions] == [r["step"] for r in ref_completions], f"{family}: completions"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_kill_and_resume_matches_uninterrupted_run(family, runner, warm, tmp_path):
    kills = KILLS or FAMILIES[family].kills
    result = run_family(family, runner, warm, tmp_path, kills)
    print(family, json.dumps(result))


def test_state_file_accepts_only_plain_containers(tmp_path):
    from dataclasses import dataclass as make_dataclass

    from reasoning.trainers.checkpoint import save_state_file

    state = {"micro_step": 3, "extra": {"replay": {"p": [{"ids": [1, 2], "r": -1.5}]}, "z": (0.5, 2.0)}}
    state["extra"]["heads"] = {"log_z.value": torch.tensor([0.25])}
    save_state_file(state, tmp_path / "state.pt")
    assert not (tmp_path / "state.pt.tmp").exists()
    loaded = load_state_file(tmp_path / "state.pt")  # weights_only=True
    assert loaded["extra"]["replay"] == state["extra"]["replay"] and loaded["extra"]["z"] == (0.5, 2.0)
    assert torch.equal(loaded["extra"]["heads"]["log_z.value"], torch.tensor([0.25]))

    @make_dataclass
    class Entry:
        value: float

    with pytest.raises(ValueError, match=r"\['extra'\]\['replay'\]\[0\] is a Entry.*dataclasses.asdict"):
        save_state_file({"extra": {"replay": [Entry(1.0)]}}, tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists()


def test_latest_checkpoint_skips_incomplete_ones(tmp_path):
    from reasoning.recipes import latest_checkpoint

    assert latest_checkpoint(tmp_path) is None
    for step in (2, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / COMPLETE_MARKER).write_text("{}")
    (tmp_path / "checkpoint-12").mkdir()  # a save that was killed: no marker
    (tmp_path / "checkpoint-12" / "model.safetensors").write_text("partial")
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")  # numeric order, not text
