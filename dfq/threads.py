"""How many torch threads a process takes by default: the cores, shared by the dfq processes running now; and how
its freed memory is kept (``keep_freed_memory``).

torch's default gives every process one thread per core. Two processes on the same cores then run twice as many
threads as there are cores, and OpenMP's spin-waiting makes each several times slower (two DVC jobs with two
threads each on 2 cores slowed generation 5-7x). So every stage registers its process in a folder of the temp
directory (``registry``: one file per process, named by its pid and holding its start time, removed at exit),
and takes ``cores // live processes`` threads, at least one. The count is taken once, when the process starts:
a process that started alone keeps its threads until it ends, and every process started beside it takes fewer.

The thread count changes the kernels' reduction order, so bytes: a stage records the count it ran with (its
``env``, dfq.provenance), and ``DFQ_THREADS`` (environment, read by the stages) fixes it for exact repeats.
Freed memory: glibc's malloc serves large blocks (above a threshold that grows to at most 32 MiB) with mmap and
gives them back to the system when freed, and trims the top of its heap beyond 128 KiB, so an evaluation pass of
batches of 500 pays page faults for every activation it allocates: measured on the 2-core machine, FP32 evaluation
of 2000 images took 0.67 s by default and 0.30 s with the blocks kept; a ZeroQ iteration 46 ms and 36.5 ms. A
process keeps them after ``keep_freed_memory()`` (its peak resident memory is then held until it exits); the bytes
computed do not change (torch aligns every block to 64 bytes either way). ``DFQ_KEEP_MEMORY=0`` turns it off.
Bottom layer: the standard library only.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import sys
import tempfile
from pathlib import Path

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 256 * 2**20  # blocks up to this size come from the heap, freed ones are reused
TRIM_THRESHOLD = 2**30  # free heap top kept up to this size instead of trimmed


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks for reuse (module docstring): large blocks from the heap up to 256 MiB,
    free heap top up to 1 GiB not returned. True when set; False off glibc (musl, macOS, Windows) or with
    ``DFQ_KEEP_MEMORY=0``."""
    if os.environ.get("DFQ_KEEP_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def registry() -> Path:
    """The folder of live dfq processes: ``DFQ_PROC_DIR``, else ``dfq-procs-<uid>`` in the temp directory."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(os.environ.get("DFQ_PROC_DIR") or Path(tempfile.gettempdir()) / f"dfq-procs-{uid}")


def start_time(pid: int) -> str:
    """The process's start time (clock ticks after boot, /proc/<pid>/stat field 22) on Linux, '' elsewhere or when
    the process does not exist; it tells a live process from a later one that reuses a dead one's pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rpartition(")")[2].split()[19]


def alive(pid: int, started: str) -> bool:
    """Whether process ``pid`` runs and is the one that registered (same start time, where the OS tells it). POSIX
    only: on Windows os.kill(pid, 0) would send a Ctrl-C, so there the registry is off (``enabled``)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = start_time(pid)
    return not (started and now and now != started)


def enabled() -> bool:
    """The registry works where processes can be probed without a signal: POSIX (Linux, macOS)."""
    return os.name == "posix"


def live(folder: Path | None = None) -> list[int]:
    """The pids of the registered processes that still run; the files of those that ended are removed. Empty where
    the registry is off."""
    if not enabled():
        return []
    folder = folder or registry()
    pids = []
    for f in sorted(folder.glob("*.pid")) if folder.is_dir() else []:
        try:
            pid, started = int(f.stem), f.read_text().strip()
        except (OSError, ValueError):
            continue  # being written or removed right now; a ValueError: not ours
        if alive(pid, started):
            pids.append(pid)
        else:
            with contextlib.suppress(OSError):
                f.unlink()
    return pids


def register(folder: Path | None = None) -> Path | None:
    """Register this process (its file is removed at exit; a killed process's file is removed by the next
    ``live``). Returns the file; None where the registry is off (``enabled``)."""
    if not enabled():
        return None
    folder = folder or registry()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{os.getpid()}.pid"
    tmp = folder / f".{os.getpid()}.tmp"
    tmp.write_text(start_time(os.getpid()))
    tmp.replace(path)
    pid = os.getpid()
    atexit.register(lambda: os.getpid() == pid and path.unlink(missing_ok=True))  # not in forked children
    return path


def default_threads(cores: int, folder: Path | None = None) -> int:
    """``cores // n`` (at least 1), n = the live registered processes, this one included when registered."""
    return max(1, cores // max(1, len(live(folder))))
