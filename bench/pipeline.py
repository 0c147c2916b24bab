"""Benchmark: the default pipeline's wall time, stage by stage, from a fresh clone (empty DVC cache).

    python -m bench.pipeline                       # clone HEAD to a temp dir, `dvc repro` there, print the times
    python -m bench.pipeline --rev main --json out.json --keep /tmp/run   # another commit; keep the clone

Every stage DVC runs is timed from its "Running stage" line to the lock-file update that ends it (a stage's
own start-up, Python and torch imports included); the table lists them in run order, then the total per stage
kind (data, fp32, generate, calibrate, ...) and the whole `dvc repro`. The environment decides threads and
device as for any run (DFQ_THREADS, DFQ_DEVICE); run it with nothing else on the machine. Not a test.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START = re.compile(r"Running stage '([^']+)'")
END = re.compile(r"^(Updating lock file|Stage '[^']+' is cached)")  # DVC's lines that end a stage


def stage_times(lines: list[tuple[float, str]]) -> dict[str, float]:
    """{stage: seconds} from (timestamp, line) pairs of `dvc repro` output: a stage runs from its "Running stage"
    line to the next lock-file update (or the next stage's start, or the last line)."""
    times, current, since = {}, None, 0.0
    for t, line in lines:
        if current and (END.match(line) or START.search(line)):
            times[current], current = t - since, None
        m = START.search(line)
        if m:
            current, since = m.group(1), t
    if current and lines:
        times[current] = lines[-1][0] - since
    return times


def by_kind(times: dict[str, float]) -> dict[str, tuple[int, float]]:
    """{kind: (stages, seconds)}: a stage's kind is its name before '@' (generate@zeroq-0 -> generate)."""
    kinds: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for name, s in times.items():
        k = kinds[name.split("@")[0]]
        k[0], k[1] = k[0] + 1, k[1] + s
    return {k: (n, s) for k, (n, s) in kinds.items()}


def run(rev: str, where: Path) -> tuple[list[tuple[float, str]], float]:
    subprocess.run(["git", "clone", "-q", str(ROOT), str(where)], check=True)
    subprocess.run(["git", "checkout", "-q", rev], cwd=where, check=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.setdefault("TQDM_DISABLE", "1")
    start, lines = time.perf_counter(), []
    proc = subprocess.Popen(["dvc", "repro"], cwd=where, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for raw in proc.stdout:
        line = raw.decode(errors="replace").rstrip()
        lines.append((time.perf_counter() - start, line))
        if START.search(line):
            print(f"{lines[-1][0]:8.1f} s  {line}", flush=True)
    if proc.wait():
        sys.exit("dvc repro failed:\n" + "\n".join(line for _, line in lines[-40:]))
    return lines, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", default="HEAD", help="the commit to time (default: HEAD)")
    ap.add_argument("--json", help="also write {stages, kinds, total_s, rev, threads} here")
    ap.add_argument("--keep", help="clone into this (new) folder and keep it")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(a.keep) if a.keep else Path(tmp) / "clone"
        lines, total = run(a.rev, where)
    times = stage_times(lines)
    kinds = by_kind(times)
    print("\n| stage | s |\n|---|---|\n" + "\n".join(f"| {k} | {s:.1f} |" for k, s in times.items()))
    print("\n| kind | stages | s | s per stage |\n|---|---|---|---|")
    for k, (n, s) in sorted(kinds.items(), key=lambda kv: -kv[1][1]):
        print(f"| {k} | {n} | {s:.1f} | {s / n:.1f} |")
    threads = os.environ.get("DFQ_THREADS", "torch default")
    print(f"\ntotal `dvc repro`: {total:.1f} s ({total / 60:.1f} min), {len(times)} stages, DFQ_THREADS={threads}")
    if a.json:
        out = {"rev": a.rev, "threads": threads, "total_s": round(total, 1), "stages": times, "kinds": kinds}
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
