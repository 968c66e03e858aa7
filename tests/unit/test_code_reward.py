"""Code-execution reward: pass fractions, program extraction, and hostile programs contained.

Each hostile program is written so that the attack *succeeding* would make it pass its test (it
prints what only a successful attack could know or do), so a reward of 0 shows containment, and
the host-side checks (files, processes, the test process and a sentinel) confirm it.
"""

import os
import secrets
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from reasoning.rewards import code
from reasoning.rewards.code import (
    SandboxLimits,
    extract_program,
    make_code_reward,
    parse_tests,
    run_program,
    sandbox_isolation,
)

LIMITS = SandboxLimits(cpu_seconds=1, wall_seconds=4.0, output_bytes=64 * 1024, workers=4)
NAMESPACES = sandbox_isolation() == "namespaces"


def test_pass_fraction_over_stdio_and_assert_tests():
    reward = make_code_reward(limits=LIMITS)
    completions = [
        "Here:\n```python\na, b = map(int, input().split())\nprint(a + b)\n```",
        "```py\ndef f(x):\n    return x * 2\n```",
        "print(int(input().split()[0]) * 2)",  # no fence: the whole text is the program
        "```python\nprint('no tests')\n```",
    ]
    tests = [
        [{"input": "1 2", "output": "3"}, {"input": "5 5\n", "output": "10\n"}],
        ["assert f(2) == 4", "assert f(3) == 7"],
        json_tests := '[{"input": "2 9", "output": "4"}, {"input": "3 0", "output": "7"}]',
        [],
    ]
    assert isinstance(json_tests, str)
    assert reward(["p"] * 4, completions, None, tests=tests) == [1.0, 0.5, 0.5, None]


def test_extraction_prefers_the_last_python_block():
    text = "```text\nnot this\n```\n```python\nfirst\n```\nthen\n```python\nsecond\n```\n```\nother\n```"
    assert extract_program(text) == "second\n"
    assert extract_program("```\nonly\n```") == "only\n"
    assert extract_program("plain") == "plain"


def test_malformed_tests_and_missing_column_are_errors():
    with pytest.raises(ValueError, match="not JSON"):
        parse_tests("{oops")
    with pytest.raises(ValueError, match="'input' and 'output'"):
        parse_tests([{"in": "1"}])
    with pytest.raises(ValueError, match="column 'tests'"):
        make_code_reward(limits=LIMITS)(["p"], ["print(1)"], None, answer=["1"])


def test_output_and_time_are_capped():
    result = run_program("import sys\nwhile True:\n    sys.stdout.write('y' * 65536)\n", "", LIMITS)
    assert result.status != "ok" and len(result.stdout) <= LIMITS.output_bytes
    short = SandboxLimits(cpu_seconds=1, wall_seconds=1.5)
    result = run_program("import time\ntime.sleep(1000)\n", "", short)
    assert result.status == "timeout"


def test_without_namespaces_the_limits_still_apply(monkeypatch):
    """The fallback mode (not root, or no unshare): rlimits, minimal environment, socket block."""
    monkeypatch.setattr(code, "sandbox_isolation", lambda: "none")
    monkeypatch.setattr(code, "sandbox_python", lambda: sys.executable)
    monkeypatch.setenv("REASONING_SANDBOX_SECRET", "s3cret")
    programs = [
        "print(input()[::-1])",
        "x = bytearray(8 * 2**30)\nprint('abc')",
        "import os\nprint(os.environ.get('REASONING_SANDBOX_SECRET', 'abc'))",
        "import socket\nsocket.socket()\nprint('cba')",
        "import os\nprint(os.getcwd().startswith(os.environ['TMPDIR']) and 'cba')",
    ]
    scores = make_code_reward(limits=LIMITS)(
        ["p"] * 5, programs, None, tests=[[{"input": "abc", "output": "cba"}]] * 5
    )
    assert scores == [1.0, 0.0, 0.0, 0.0, 1.0]


def _sandbox_processes() -> list[int]:
    """Pids of live processes owned by the sandbox uids."""
    uids = {str(LIMITS.base_uid + i) for i in range(LIMITS.workers)}
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            real_uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
            if real_uid in uids:
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not NAMESPACES, reason="needs root and unshare (network/mount/PID namespaces)")
def test_hostile_programs_are_contained(tmp_path, monkeypatch):
    secret = secrets.token_hex(16)
    monkeypatch.setenv("REASONING_SANDBOX_SECRET", secret)
    token = secrets.token_hex(8)
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:  # a local service that hands out the token to whoever connects
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.sendall(token.encode())
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    sentinel = subprocess.Popen(["sleep", "300"])
    # World-writable victims outside the sandbox's directory (outside /tmp as well, which is private).
    victim_dir = Path("/run") / f"reasoning-sandbox-test-{os.getpid()}"
    victim_dir.mkdir(mode=0o777, exist_ok=True)
    victim_dir.chmod(0o777)
    victim = victim_dir / "victim.txt"
    victim.write_text("intact")
    victim.chmod(0o666)
    host_tmp_marker = Path("/tmp") / f"reasoning-sandbox-escape-{os.getpid()}"
    repo_marker = Path(__file__).parent / f".sandbox-escape-{os.getpid()}"
    shadow = Path("/etc/shadow").read_text().splitlines()[0] if Path("/etc/shadow").exists() else "root"
    me, sentinel_pid = str(os.getpid()), str(sentinel.pid)
    # (name, program, stdin, output only a successful attack produces)
    hostile = [
        ("infinite loop", "while True:\n    pass\nprint('done')", "", "done"),
        ("sleep forever", "import time\ntime.sleep(10**6)\nprint('done')", "", "done"),
        (
            "ignore SIGXCPU",
            "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass",
            "",
            "done",
        ),
        (
            "fork bomb",
            "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
            "",
            "x",
        ),
        (
            "detached daemon",
            "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('spawned')",
            "",
            "never",
        ),
        ("memory bomb", "x = bytearray(8 * 2**30)\nprint(len(x))", "", str(8 * 2**30)),
        ("memory growth", "x = []\nwhile True:\n    x.append(bytearray(10**7))", "", "x"),
        ("huge output", "import sys\nwhile True:\n    sys.stdout.write('y' * 65536)", "", "y"),
        ("one huge line", "print('z' * 10**9)", "", "z"),
        ("disk filler", "open('big', 'wb').write(b'0' * 2**30)\nprint('written')", "", "written"),
        ("open many files", "fs = [open('f%d' % i, 'w') for i in range(5000)]\nprint(len(fs))", "", "5000"),
        (
            "write outside the temp dir",
            "p = input()\nopen(p, 'w').write('pwned')\nprint(open(p).read())",
            str(victim),
            "pwned",
        ),
        ("delete outside the temp dir", "import os\nos.remove(input())\nprint('gone')", str(victim), "gone"),
        ("write the repository", "open(input(), 'w').write('x')\nprint('ok')", str(repo_marker), "ok"),
        (
            "read an environment secret",
            "import os\nprint(os.environ['REASONING_SANDBOX_SECRET'])",
            "",
            secret,
        ),
        (
            "read the parent's environment",
            "pid = input()\nenv = open('/proc/%s/environ' % pid, 'rb').read().split(b'\\0')\n"
            "print([e for e in env if e.startswith(b'REASONING_SANDBOX_SECRET=')][0][25:].decode())",
            me,
            secret,
        ),
        ("read /etc/shadow", "print(open('/etc/shadow').readline().rstrip())", "", shadow),
        (
            "open a socket",
            "import socket\ns = socket.create_connection(('127.0.0.1', int(input())))\nprint(s.recv(64).decode())",
            str(port),
            token,
        ),
        (
            "raw _socket",
            "import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', int(input())))\nprint(s.recv(64).decode())",
            str(port),
            token,
        ),
        (
            "shell out",
            "import subprocess\nprint(subprocess.run(['id', '-u'], capture_output=True, text=True).stdout)",
            "",
            "0",
        ),
        ("kill the parent", "import os\nos.kill(os.getppid(), 9)\nprint('alive')", "", "alive"),
        (
            "kill a host process",
            "import os\nos.kill(int(input()), 9)\nprint('killed')",
            sentinel_pid,
            "killed",
        ),
        (
            "killpg the trainer",
            "import os\nos.killpg(os.getpgid(int(input())), 9)\nprint('killed')",
            me,
            "killed",
        ),
        ("kill everything", "import os\nos.kill(-1, 9)\nprint('killed')", "", "killed"),
        ("regain root", "import os\nos.setuid(0)\nprint(os.getuid())", "", "0"),
        ("read the trainer's memory", "f = open('/proc/%s/mem' % input(), 'rb')\nprint('read')", me, "read"),
        ("write the host /tmp", "open(input(), 'w').write('x')\nprint('ok')", str(host_tmp_marker), "never"),
    ]
    assert len(hostile) >= 20
    control = ("control", "print(input()[::-1])", "abc", "cba")
    cases = [*hostile, control]
    reward = make_code_reward(limits=LIMITS)
    try:
        scores = reward(
            ["p"] * len(cases),
            [f"```python\n{program}\n```" for _, program, _, _ in cases],
            None,
            tests=[[{"input": stdin, "output": expected}] for _, _, stdin, expected in cases],
        )
        assert sentinel.poll() is None, "the sandbox killed a host process"
        assert os.getppid() > 1
        os.kill(os.getppid(), 0)  # the test process's parent lives as well
        assert victim.read_text() == "intact"
        assert not host_tmp_marker.exists() and not repo_marker.exists()
        assert _sandbox_processes() == [], "a sandboxed process outlived its run"
        # the server is still answering the test process: the sandbox's failure was its own network
        assert socket.create_connection(("127.0.0.1", port)).recv(64).decode() == token
    finally:
        sentinel.kill()
        server.close()
        victim.unlink(missing_ok=True)
        repo_marker.unlink(missing_ok=True)
        host_tmp_marker.unlink(missing_ok=True)
        victim_dir.rmdir()
    failed = {name: score for (name, *_), score in zip(cases, scores) if score != 0.0}
    assert failed == {"control": 1.0}, f"hostile programs that passed (attack succeeded): {failed}"
