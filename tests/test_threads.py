"""dfq.threads: the default thread count is the cores shared by the live dfq processes (a registry of pids)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dfq import threads

ROOT = Path(__file__).resolve().parents[1]


def _sleeper(folder: Path) -> subprocess.Popen:
    """A second process that registers itself in ``folder``, says so on stdout and waits for its stdin to close."""
    code = f"from pathlib import Path; from dfq import threads; threads.register(Path({str(folder)!r})); "
    code += "print('ready', flush=True); import sys; sys.stdin.read()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_alone_takes_every_core(tmp_path):
    threads.register(tmp_path)
    assert threads.live(tmp_path) == [os.getpid()]
    assert threads.default_threads(4, tmp_path) == 4
    assert threads.default_threads(1, tmp_path) == 1


def test_two_processes_share_the_cores(tmp_path):
    threads.register(tmp_path)
    other = _sleeper(tmp_path)
    try:
        assert sorted(threads.live(tmp_path)) == sorted([os.getpid(), other.pid])
        assert threads.default_threads(4, tmp_path) == 2  # 4 cores // 2 processes
        assert threads.default_threads(2, tmp_path) == 1
        assert threads.default_threads(1, tmp_path) == 1  # never 0
    finally:
        other.communicate("")
    # it ended normally: its file went with it
    assert not (tmp_path / f"{other.pid}.pid").exists()
    assert threads.live(tmp_path) == [os.getpid()]


def test_a_killed_process_is_not_counted_and_its_file_is_removed(tmp_path):
    other = _sleeper(tmp_path)
    other.kill()
    other.wait()
    assert (tmp_path / f"{other.pid}.pid").exists()  # SIGKILL: no atexit
    assert threads.live(tmp_path) == []
    assert not (tmp_path / f"{other.pid}.pid").exists()
    assert threads.default_threads(2, tmp_path) == 2


def test_a_reused_pid_is_not_the_registered_process(tmp_path):
    # this process's pid, registered with another start time: a dead process whose pid was given to us
    (tmp_path / f"{os.getpid()}.pid").write_text("1")
    assert threads.start_time(os.getpid()) not in ("", "1")
    assert threads.live(tmp_path) == []


def test_setup_torch_shares_the_cores_and_dfq_threads_overrides(tmp_path):
    other = _sleeper(tmp_path)
    probe = textwrap.dedent(
        """
        import torch
        cores = torch.get_num_threads()
        from stages._common import setup_torch
        print(cores, setup_torch().get_num_threads())
        """
    )
    env = {**os.environ, "DFQ_PROC_DIR": str(tmp_path)}
    env.pop("DFQ_THREADS", None)
    try:
        run = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        cores, taken = map(int, run.stdout.split())
        assert taken == max(1, cores // 2)  # torch's default count shared by two live processes
        env["DFQ_THREADS"] = "3"
        run = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True)
        assert run.stdout.split() == [str(cores), "3"], run.stderr
    finally:
        other.communicate("")


def test_off_where_processes_cannot_be_probed(tmp_path, monkeypatch):
    other = _sleeper(tmp_path)  # registered while the registry works (POSIX)
    try:
        monkeypatch.setattr(threads.os, "name", "nt")  # Windows: os.kill(pid, 0) would send a Ctrl-C
        assert threads.register(tmp_path) is None and threads.live(tmp_path) == []
        assert threads.default_threads(4, tmp_path) == 4  # torch's default, as before the registry
    finally:
        other.communicate("")


RSS_PROBE = """
import os, sys, torch
from dfq.threads import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
x = torch.ones(64 * 2**20 // 4)  # 64 MiB, every page touched
del x
print(kept, int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_keep_freed_memory_keeps_a_freed_block_resident(tmp_path):
    """By default glibc gives a freed 64 MiB block back to the system (it was mmapped); after keep_freed_memory the
    block came from the heap and stays resident for the next allocation: the resident sizes differ by ~64 MiB."""
    probe = tmp_path / "probe.py"
    probe.write_text(RSS_PROBE)
    env = {**os.environ, "DFQ_KEEP_MEMORY": "1"}
    out = {
        mode: subprocess.run(
            [sys.executable, str(probe), mode], capture_output=True, text=True, env=env, check=True
        ).stdout.split()
        for mode in ("keep", "default")
    }
    assert out["keep"][0] == "True" and out["default"][0] == "False"
    assert int(out["keep"][1]) - int(out["default"][1]) > 48 * 2**20
    off = subprocess.run(
        [sys.executable, str(probe), "keep"], capture_output=True, text=True, env={**env, "DFQ_KEEP_MEMORY": "0"}
    )
    assert off.stdout.split()[0] == "False"
