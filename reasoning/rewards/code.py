"""Code-execution reward: run candidate programs in a sandbox and score the fraction of tests passed.

`code_reward(prompts, completions, completion_ids, tests=...)` is a TRL-style reward: for each
completion it extracts the program (the last ```python fenced block, else the last fenced block,
else the whole text), runs it against that sample's test cases and returns
`passed / len(tests)` (None, "not applicable", for a sample without tests). A test case is either
- a mapping `{"input": STDIN, "output": EXPECTED_STDOUT}`: the program reads stdin and passes when
  its stdout equals the expected output (trailing whitespace on each line and trailing blank lines
  ignored), or
- a string of Python code (e.g. `assert f(2) == 4`) appended to the program: passes on exit code 0.
The `tests` column may hold the list itself or a JSON string of it.

Sandbox (one fresh process per program × test; see docs/reliability.md for the threat model):
- resource limits set before the untrusted code runs: CPU seconds (RLIMIT_CPU, SIGXCPU then SIGKILL),
  address space (RLIMIT_AS), processes (RLIMIT_NPROC), file size (RLIMIT_FSIZE: also caps stdout and
  stderr, which go to files), open files (RLIMIT_NOFILE), no core dumps; a wall-clock timeout kills
  the whole process group (`start_new_session`);
- a minimal environment (PATH, LANG, HOME and TMPDIR only: no secrets of the parent), a fresh
  working directory, `python -I -S` (no user site, no PYTHON* variables, stdlib only);
- where namespaces are available (root, `unshare` from util-linux: checked once per process) the
  program runs in new network, mount and PID namespaces: no network at all (only a down loopback),
  private tmpfs mounts over the world-writable directories (/tmp, /var/tmp, /dev/shm, /run/lock),
  a fresh /proc showing only its own processes, and everything it started dies with it (`unshare
  --kill-child`). It then drops to an unprivileged uid of its own (one per worker slot, so process
  limits and signals never reach another sandbox), with no supplementary groups and
  PR_SET_NO_NEW_PRIVS (no setuid binaries);
- without namespaces (not root, or `unshare` missing/refused) only the limits, the environment, the
  temp directory and an in-process socket block remain: a speed bump, not a wall (ctypes can get
  round it, and a program can signal processes of the same user). `sandbox_isolation()` says which
  mode is active.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from reasoning.rewards.verifier import completion_text


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed run."""

    cpu_seconds: int = 2
    wall_seconds: float = 6.0
    memory_bytes: int = 512 * 2**20
    max_processes: int = 16
    max_open_files: int = 64
    output_bytes: int = 1 * 2**20
    tmpfs_bytes: int = 16 * 2**20
    workers: int = 4
    base_uid: int = 61000


@dataclass(frozen=True)
class ExecutionResult:
    """What happened to one run: `status` is ok, error (non-zero exit), timeout or killed (signal)."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str


# The bootstrap runs as the sandbox's first process (the PID-namespace init when namespaces are
# on). It reads the program while it may still read the parent's files, sets up mounts, limits and
# the uid, then runs the program in-process, so nothing of the bootstrap needs to be readable later.
_BOOTSTRAP = r"""
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1])
source = open(cfg["program"]).read()
libc = ctypes.CDLL(None, use_errno=True)
if cfg["namespaces"]:
    # Every mount read-only (this mount namespace's copies only), then private writable tmpfs
    # over the world-writable directories: the program can write nowhere else.
    with open("/proc/self/mounts") as f:
        points = sorted({line.split()[1].replace("\\040", " ") for line in f}, key=len)
    for point in points:
        libc.mount(None, point.encode(), None, 4096 | 32 | 1, None)  # MS_BIND | MS_REMOUNT | MS_RDONLY
    options = ("size=%d,mode=1777" % cfg["tmpfs_bytes"]).encode()
    for target in (b"/tmp", b"/var/tmp", b"/dev/shm", b"/run/lock"):
        if os.path.isdir(target) and libc.mount(b"none", target, b"tmpfs", 0, options) != 0:
            raise SystemExit("sandbox: cannot mount a private tmpfs on %r" % target)
    if libc.mount(b"proc", b"/proc", b"proc", 0, None) != 0:
        raise SystemExit("sandbox: cannot mount /proc")
    work = "/tmp/work"
    os.mkdir(work, 0o700)
    os.chown(work, cfg["uid"], cfg["uid"])
else:
    work = cfg["workdir"]
os.chdir(work)
# This process stays outside the program's reach (as the PID namespace's init it cannot be
# signalled from inside, and it keeps root there); the program runs in a child and this process
# reports the child's fate: its exit code, or 128 + n for death by signal n.
program = os.fork()
if program:
    while True:
        pid, status = os.wait()
        if pid == program:
            break
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
limits = [
    (resource.RLIMIT_CPU, cfg["cpu"], cfg["cpu"] + 1),
    (resource.RLIMIT_AS, cfg["memory"], cfg["memory"]),
    (resource.RLIMIT_FSIZE, cfg["output"], cfg["output"]),
    (resource.RLIMIT_NOFILE, cfg["nofile"], cfg["nofile"]),
    (resource.RLIMIT_NPROC, cfg["nproc"], cfg["nproc"]),
    (resource.RLIMIT_CORE, 0, 0),
]
for kind, soft, hard in limits:
    resource.setrlimit(kind, (soft, hard))
if cfg["uid"] is not None:
    os.setgroups([])
    os.setgid(cfg["uid"])
    os.setuid(cfg["uid"])
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: setuid binaries cannot give root back
import socket
def _no_network(*args, **kwargs):
    raise PermissionError("network access is disabled in the sandbox")
socket.socket = socket.create_connection = socket.socketpair = socket.fromfd = _no_network
sys.argv = ["program.py"]
exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
"""


def _world_readable(path: str) -> bool:
    """Whether every directory above `path` lets other users through (x) and `path` is readable."""
    current = Path(path).resolve()
    for parent in [current, *current.parents]:
        mode = parent.stat().st_mode
        if parent != current and not mode & stat.S_IXOTH:
            return False
    return bool(current.stat().st_mode & stat.S_IROTH)


@lru_cache(maxsize=1)
def sandbox_isolation() -> str:
    """`"namespaces"` (root and `unshare` works: network/mount/PID namespaces and a uid drop) or `"none"`."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return "none"
    probe = subprocess.run(
        ["unshare", "--net", "--mount", "--pid", "--fork", "--kill-child", "true"], capture_output=True
    )
    return "namespaces" if probe.returncode == 0 else "none"


@lru_cache(maxsize=1)
def sandbox_python() -> str:
    """The interpreter candidates run on: this one, unless an unprivileged uid cannot read it (e.g. a
    pyenv under a 0700 /root), then the system's python3. Candidates get the standard library only."""
    if sandbox_isolation() == "none":
        return sys.executable
    for candidate in (os.path.realpath(sys.executable), shutil.which("python3") or "", "/usr/bin/python3"):
        if candidate and os.path.exists(candidate) and _world_readable(candidate):
            prefix = subprocess.run(
                [candidate, "-I", "-S", "-c", "import sys; print(sys.base_prefix)"],
                capture_output=True,
                text=True,
            ).stdout.strip()
            if prefix and _world_readable(prefix):
                return candidate
    raise RuntimeError(
        "no Python interpreter is readable by an unprivileged user for the code sandbox; install "
        "python3 system-wide (e.g. /usr/bin/python3)"
    )


_MINIMAL_PATH = "/usr/local/bin:/usr/bin:/bin"


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc)."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            if f"\nPPid:\t{pid}\n" in status:
                children.append(int(entry.name))
    return children


def _kill(pid: int) -> None:
    """SIGKILL a process (a negative pid: a process group); gone already is fine."""
    try:
        if pid < 0:
            os.killpg(-pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _read_capped(path: Path, limit: int) -> str:
    with path.open("rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def run_program(
    source: str, stdin: str = "", limits: SandboxLimits | None = None, uid: int | None = None
) -> ExecutionResult:
    """Run Python `source` in the sandbox with `stdin`; never raises for anything the program does.

    `uid` is the unprivileged uid to drop to (namespace mode); default `limits.base_uid`.
    """
    limits = limits or SandboxLimits()
    namespaces = sandbox_isolation() == "namespaces"
    with tempfile.TemporaryDirectory(prefix="reasoning-sandbox-") as tmp:
        root = Path(tmp)
        program = root / "program.py"
        program.write_text(source)
        (root / "stdin").write_text(stdin)
        config = {
            "program": str(program),
            "namespaces": namespaces,
            "uid": (limits.base_uid if uid is None else uid) if namespaces else None,
            "workdir": str(root),
            "cpu": limits.cpu_seconds,
            "memory": limits.memory_bytes,
            "output": limits.output_bytes,
            "nofile": limits.max_open_files,
            "nproc": limits.max_processes,
            "tmpfs_bytes": limits.tmpfs_bytes,
        }
        home = "/tmp/work" if namespaces else str(root)
        env = {"PATH": _MINIMAL_PATH, "LANG": "C.UTF-8", "HOME": home, "TMPDIR": home}
        command = [sandbox_python(), "-I", "-S", "-c", _BOOTSTRAP, json.dumps(config)]
        if namespaces:
            command = ["unshare", "--net", "--mount", "--pid", "--fork", "--kill-child", "--", *command]
        with (
            (root / "stdin").open("rb") as stdin_file,
            (root / "stdout").open("wb") as out,
            (root / "stderr").open("wb") as err,
        ):
            process = subprocess.Popen(
                command,
                stdin=stdin_file,
                stdout=out,
                stderr=err,
                cwd=str(root),
                env=env,
                start_new_session=True,
                close_fds=True,
            )
            try:
                returncode = process.wait(timeout=limits.wall_seconds)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
                if namespaces:
                    # Kill the PID namespace's init (unshare's child): the kernel then kills and reaps
                    # everything inside before unshare sees it exit. Killing unshare first would
                    # orphan the init to a host init that may never reap it.
                    for child in _children(process.pid):
                        _kill(child)
                    try:
                        returncode = process.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        pass
            # Kill the whole session either way: without namespaces a program may leave children
            # behind that nothing else would stop.
            _kill(-process.pid)
            if timed_out:
                returncode = process.wait()
        stdout = _read_capped(root / "stdout", limits.output_bytes)
        stderr = _read_capped(root / "stderr", limits.output_bytes)
    if timed_out:
        status = "timeout"
    elif returncode < 0 or returncode > 128:  # unshare reports its child's death by signal as 128 + n
        status = "killed"
    elif returncode:
        status = "error"
    else:
        status = "ok"
    return ExecutionResult(status=status, returncode=returncode, stdout=stdout, stderr=stderr)


_FENCE = re.compile(r"```([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.S)


def extract_program(completion: Any) -> str:
    """The program in a completion: the last ```python (or py/python3) fenced block, else the last
    fenced block of any language, else the whole text."""
    text = completion_text(completion)
    blocks = _FENCE.findall(text)
    python = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
    if python:
        return python[-1]
    if blocks:
        return blocks[-1][1]
    return text


def _normalise_output(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines()).rstrip()


def parse_tests(tests: Any) -> list[dict[str, str] | str]:
    """A sample's test cases: a list (or a JSON string of one) of {input, output} mappings or code strings."""
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except json.JSONDecodeError as err:
            raise ValueError(f"the tests column holds a string that is not JSON: {tests[:200]!r}") from err
    if tests is None:
        return []
    if isinstance(tests, dict) and set(tests) >= {"input", "output"} and isinstance(tests["input"], list):
        # column-oriented form, e.g. {"input": [...], "output": [...]} as in several code datasets
        tests = [{"input": i, "output": o} for i, o in zip(tests["input"], tests["output"])]
    if not isinstance(tests, list):
        raise ValueError(f"tests must be a list of test cases, got {type(tests).__name__}: {tests!r:.200}")
    for case in tests:
        if isinstance(case, dict):
            if not {"input", "output"} <= set(case):
                raise ValueError(f"a test case mapping needs 'input' and 'output' keys, got {sorted(case)}")
        elif not isinstance(case, str):
            raise ValueError(f"a test case is a mapping or a code string, got {type(case).__name__}")
    return tests


def passes(program: str, case: dict[str, str] | str, limits: SandboxLimits, uid: int | None = None) -> bool:
    """Whether `program` passes one test case in the sandbox."""
    if isinstance(case, str):
        return run_program(program + "\n\n" + case + "\n", "", limits, uid).status == "ok"
    result = run_program(program, str(case["input"]), limits, uid)
    return result.status == "ok" and _normalise_output(result.stdout) == _normalise_output(
        str(case["output"])
    )


def make_code_reward(column: str = "tests", limits: SandboxLimits | None = None):
    """A TRL-style reward `f(prompts, completions, completion_ids, **columns)` -> pass fraction per sample.

    Runs every (completion, test) pair in the sandbox, `limits.workers` at a time, each worker with
    its own uid (`limits.base_uid + slot`). Samples whose `column` is empty or missing get None.
    """
    limits = limits or SandboxLimits()

    def code_reward(prompts: list, completions: list, completion_ids: list | None = None, **columns: Any):
        if column not in columns:
            raise ValueError(
                f"the code reward reads test cases from the dataset column {column!r}, which the batch "
                f"does not have (columns: {sorted(k for k in columns if k != 'trainer_state')})"
            )
        cases = [parse_tests(t) for t in columns[column]]
        programs = [extract_program(c) for c in completions]
        jobs = [(i, case) for i, sample_cases in enumerate(cases) for case in sample_cases]
        uids: queue.Queue[int] = queue.Queue()
        for slot in range(limits.workers):
            uids.put(limits.base_uid + slot)

        def run_job(job: tuple[int, Any]) -> tuple[int, bool]:
            i, case = job
            uid = uids.get()
            try:
                return i, passes(programs[i], case, limits, uid)
            finally:
                uids.put(uid)

        passed = [0] * len(completions)
        with ThreadPoolExecutor(max_workers=limits.workers) as pool:
            for i, ok in pool.map(run_job, jobs):
                passed[i] += ok
        return [passed[i] / len(cases[i]) if cases[i] else None for i in range(len(completions))]

    code_reward.__name__ = "code"
    return code_reward


code_reward = make_code_reward()
