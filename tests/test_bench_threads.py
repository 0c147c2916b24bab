"""bench/threads.py: its processes run at once under the thread rule asked for."""

from bench.threads import measure


def test_processes_report_the_threads_their_rule_gives():
    got = measure("one", 2, iters=2)  # DFQ_THREADS=1 in both
    assert [t for t, _ in got] == [1, 1] and all(ms > 0 for _, ms in got)
    [(default, _)] = measure("torch", 1, iters=2)  # torch's own count in a fresh process
    [(alone, _)] = measure("registry", 1, iters=2)  # alone in a fresh registry: all of it
    assert alone == default
