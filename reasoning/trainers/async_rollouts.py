"""One-step-off-policy rollouts: the next generation is sampled while the trainer trains on this one.

Schedule (`max_staleness`, in optimizer steps). A generation cycle serves S = steps_per_generation ×
num_iterations / gradient_accumulation_steps optimizer steps. The next cycle's rollouts are started
at the beginning of the optimizer step after which min(max_staleness, S) steps of the current cycle
remain: the engine is synced with the weights of that moment, the next cycle's prompts (read ahead
from `GroupBatchSampler`) are handed to a background thread, and the trainer goes on training. With
the defaults (S = 1) and `max_staleness: 1`, step t trains on rollouts of the weights after step
t − 1 while the engine samples step t + 1's from the weights after step t; the first cycle is
sampled synchronously. Scoring, advantages and old log-probs stay in the trainer's thread when the
cycle begins (reward functions run user code, and the statistics are collectives across ranks), so
only `engine.generate` runs in the background. `max_staleness: 0` (the default) is the synchronous
loop. At most one generation is ahead: a staleness above S is S.

Same rollouts, other weights. The background generation uses the seeds and sampling of the step at
which its cycle begins (`generation_sampling(step)`, `prompt_seeds(count, step)`), so it draws the
random numbers a synchronous run would draw there; only the weights are older. When its cycle
begins, the rows handed to `generate` must be the ones read ahead (same prompt ids, sampling, seeds),
else the prefetched rollouts are dropped with a warning and the cycle is sampled synchronously.

Threads. vLLM's `LLM.generate` with the engine core in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`)
adds its requests and steps the `InprocClient`'s `EngineCore` in the calling thread until they finish
(vllm/entrypoints/common/offline.py `_run_engine`, vllm/v1/engine/core_client.py `InprocClient`); it
keeps its own model weights (synced by copy) and per-request seeded generators, so the trainer's
torch work in the main thread does not touch it, and the main thread's CPU thread count stays as the
engine left it (`restore_torch_threads`). What must not happen is two callers inside the engine at
once (one scheduler) or a weight reload during a generation: a lock is held by the background
generation, and `sync_engine` / `evaluation_engine` wait for it (`RolloutPrefetch.idle`). The engine
must run without tensor parallelism (the tensor-parallel pooling is a collective). A `vllm-server`
engine only makes HTTP requests and is thread-safe as well. The `hf` engine seeds the process-wide
torch generator (`torch.manual_seed` inside `fork_rng`), which a background thread would race with
the trainer's own draws, so its prefetch runs inline at the same point: the same batches, no overlap.

Checkpoints. A checkpoint written while a generation is ahead waits for it and stores its rollouts
(`state_dict`); a resumed run trains on them, so a resume equals the uninterrupted run whatever
`save_steps` is. Runs are reproducible when the rollout seed is set (vLLM's unseeded requests draw
from the process-wide generator, in whichever thread runs them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from reasoning.rollout import Rollout, RolloutEngine, Sampling

logger = logging.getLogger(__name__)


def launch_offset(micro_step: int, accumulation: int, cycle: int, max_staleness: int) -> int | None:
    """Optimizer steps until the next generation cycle begins, if its rollouts are due to start at
    micro-step `micro_step` (0-based, counted since training began), else None.

    `cycle`: micro-steps per generation cycle (steps_per_generation × num_iterations, a multiple of
    `accumulation`). Due at the first micro-step of the optimizer step after which
    min(max_staleness, steps per cycle) steps of the cycle remain: once per cycle, never when
    `max_staleness` is 0.
    """
    if max_staleness <= 0 or micro_step % accumulation:
        return None
    steps = cycle // accumulation
    left = steps - (micro_step % cycle) // accumulation
    return left if left == min(max_staleness, steps) else None


def generates_in_background(engine: RolloutEngine) -> bool:
    """Whether `engine.generate` may run in a thread beside training (see the module docstring):
    the in-process vLLM engine without tensor parallelism and `vllm-server` engines; not `hf`."""
    # the engine classes are looked up where they are already imported: an engine of a module that
    # was never imported is not of that class (and importing vLLM's wrapper here would be wasted)
    colocated = sys.modules.get("reasoning.rollout.vllm_engine")
    if colocated is not None and isinstance(engine, colocated.VLLMEngine):
        return engine.tensor_parallel_size == 1
    server = sys.modules.get("reasoning.rollout.vllm_server")
    return server is not None and isinstance(engine, server.VLLMServerEngine)


@dataclass
class Request:
    """What a prefetched generation samples: `cycle` (generation cycles since training began), the
    optimizer step whose weights the engine holds (`version`) and the engine call's arguments."""

    cycle: int
    version: int
    prompt_ids: list[list[int]]
    sampling: Sampling
    n: int
    seeds: list[int] | None

    def serves(self, prompt_ids: list[list[int]], sampling: Sampling, n: int, seeds: list[int] | None) -> bool:
        return (
            [list(p) for p in prompt_ids] == self.prompt_ids
            and sampling == self.sampling
            and n == self.n
            and (None if seeds is None else list(seeds)) == self.seeds
        )


@dataclass
class Prefetched:
    """A finished prefetched generation: its request, rollouts and the engine's seconds on it."""

    request: Request
    groups: list[list[Rollout]]
    seconds: float


class RolloutPrefetch:
    """One generation running ahead of training (in a background thread when the engine allows it).

    `start(request)` syncs nothing (the caller syncs the engine first) and samples `request` in the
    background; `take(...)` waits for it and returns it when it serves the given call (else drops
    it); `idle()` is a context in which the engine is not generating (for weight syncs and
    evaluations); `state_dict()` / `load_state_dict()` carry a pending generation through a checkpoint.
    """

    def __init__(self, engine: RolloutEngine, background: bool | None = None) -> None:
        self.engine = engine
        self.background = generates_in_background(engine) if background is None else background
        self._lock = threading.Lock()  # held while the engine generates
        self._executor: ThreadPoolExecutor | None = None
        self._request: Request | None = None
        self._future: Future[tuple[list[list[Rollout]], float]] | None = None
        self._warned = False
        self._threads = torch.get_num_threads()

    @property
    def pending(self) -> Request | None:
        """The request started (running or finished) and not yet taken."""
        return self._request

    def _generate(self, request: Request) -> tuple[list[list[Rollout]], float]:
        # torch sets a thread's OpenMP count lazily, at its first parallel op, to the last count any
        # thread set; vLLM's CPU attention plans with the count it reads first and refuses a different
        # one at run time ("thread_num == thread_num (2 vs. 1)"). Fix this thread's count before vLLM runs.
        torch.set_num_threads(self._threads)
        with self._lock:
            start = time.monotonic()
            groups = self.engine.generate(request.prompt_ids, request.sampling, n=request.n, seeds=request.seeds)
            return groups, time.monotonic() - start

    def start(self, request: Request) -> None:
        """Sample `request` ahead (the engine must already hold the weights of `request.version`)."""
        if self._request is not None:
            raise RuntimeError(
                f"a generation for cycle {self._request.cycle} is already ahead; take it before starting another"
            )
        self._request = request
        self._threads = torch.get_num_threads()  # the trainer's count, for the generating thread
        if not self.background:
            future: Future = Future()
            try:
                future.set_result(self._generate(request))
            except BaseException as error:  # raised where it is taken, as from the thread
                future.set_exception(error)
            self._future = future
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-prefetch")
        self._future = self._executor.submit(self._generate, request)

    def wait(self) -> float:
        """Block until the pending generation (if any) has finished; the seconds waited."""
        if self._future is None:
            return 0.0
        start = time.monotonic()
        self._future.exception()  # waits; an error is raised by `take`
        return time.monotonic() - start

    def take(
        self, prompt_ids: list[list[int]], sampling: Sampling, n: int, seeds: list[int] | None
    ) -> tuple[Prefetched | None, float]:
        """(the pending generation if it serves this engine call, else None; seconds waited for it).

        A pending generation for another call is dropped (with a warning, once): the caller samples
        synchronously instead. An error of the background generation is raised here.
        """
        request, future = self._request, self._future
        if request is None or future is None:
            return None, 0.0
        waited = self.wait()
        self._request = self._future = None
        groups, seconds = future.result()
        if not request.serves(prompt_ids, sampling, n, seeds):
            if not self._warned:
                self._warned = True
                logger.warning(
                    "the rollouts sampled ahead for generation cycle %d were for other prompts or seeds than the "
                    "cycle's; they are dropped and the cycle is sampled now (max_staleness has no effect here)",
                    request.cycle,
                )
            return None, waited
        return Prefetched(request, groups, seconds), waited

    @contextlib.contextmanager
    def idle(self) -> Iterator[None]:
        """A block in which the engine is not generating (the pending generation, if any, finished)."""
        self.wait()
        with self._lock:
            yield

    def discard(self) -> None:
        """Drop the pending generation (after waiting for it: a vLLM generation cannot be interrupted)."""
        self.wait()
        self._request = self._future = None

    def close(self) -> None:
        """Drop the pending generation and stop the thread (a later `start` starts another)."""
        self.discard()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def state_dict(self) -> dict[str, Any] | None:
        """The pending generation as plain containers (waits for it), or None."""
        request, future = self._request, self._future
        if request is None or future is None:
            return None
        groups, seconds = future.result()
        return {
            "request": {**dataclasses.asdict(request), "sampling": dataclasses.asdict(request.sampling)},
            "groups": [[dataclasses.asdict(rollout) for rollout in group] for group in groups],
            "seconds": seconds,
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore a pending generation saved by `state_dict` (None: nothing pending)."""
        self.discard()
        if state is None:
            return
        fields = dict(state["request"])
        sampling = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.pop("sampling").items()}
        request = Request(**fields, sampling=Sampling(**sampling))
        groups = [[Rollout(**rollout) for rollout in group] for group in state["groups"]]
        future: Future = Future()
        future.set_result((groups, float(state["seconds"])))
        self._request, self._future = request, future
