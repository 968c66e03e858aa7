"""Shared fixtures: a briefly trained tiny model (non-degenerate outputs) and one vLLM engine per session."""

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import pytest  # noqa: E402

from reasoning.testing import train_tiny_sft  # noqa: E402

CHILD_ENV = "REASONING_TEST_CHILD"  # set in the process that runs an `own_process` test's body
TRAINED_TINY_ENV = "REASONING_TRAINED_TINY_DIR"


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "own_process: runs in a fresh pytest process (it starts and closes a vLLM engine of its own: "
        "vLLM's shutdown tears down the parallel state that the session's shared engine still uses)",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """Run an `own_process` test's body in a child pytest process; the child's result is the test's."""
    if pyfuncitem.get_closest_marker("own_process") is None or os.environ.get(CHILD_ENV):
        return None
    env = {**os.environ, CHILD_ENV: "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if "trained_tiny_dir" in pyfuncitem.funcargs:
        env[TRAINED_TINY_ENV] = str(pyfuncitem.funcargs["trained_tiny_dir"])
    command = [sys.executable, "-m", "pytest", pyfuncitem.nodeid, "-q", "-p", "no:cacheprovider", "-x"]
    child = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert child.returncode == 0, f"{pyfuncitem.nodeid} failed in its own process:\n{child.stdout[-6000:]}"
    assert " passed" in child.stdout, child.stdout[-2000:]
    return True


@pytest.fixture(scope="session")
def trained_tiny_dir(tmp_path_factory):
    """A 1M-parameter model after 60 SFT steps on addition: it writes the format, often wrongly.

    A test re-run in its own process (`own_process`) reuses the parent's copy."""
    if os.environ.get(TRAINED_TINY_ENV):
        return Path(os.environ[TRAINED_TINY_ENV])
    path = tmp_path_factory.mktemp("tiny-trained")
    # seed 42: transformers' default, with which the tests' tolerances were set
    return train_tiny_sft(path, "synthetic:addition?digits=3&n=4000&seed=5&split=train", steps=60, seed=42)


@pytest.fixture(scope="session")
def vllm_engine(trained_tiny_dir):
    """One in-process vLLM engine (CPU build, fp32) for the whole test session."""
    from reasoning.rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(str(trained_tiny_dir), dtype="float32", max_model_len=256, seed=0)
    yield engine
    engine.close()


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def run_cli():
    """Run the real `reasoning` command (`python -m reasoning ...`) from the repository root."""

    def run(*args: str, timeout: float = 600, env: dict | None = None, module: list[str] | None = None):
        environment = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **(env or {})}
        command = [sys.executable, *(module or ["-m", "reasoning"]), *args]
        return subprocess.run(
            command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout
        )

    return run
