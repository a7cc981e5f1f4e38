"""Measure the cost of tracking one action's processes: ``track()`` plus ``release()``.

Usage: ``.venv/bin/python benchmarks/proctree_track_cost.py [actions] [gap seconds]``

For each mechanism available here, the script starts ``actions`` ``/bin/sleep`` processes
one after another, ``gap`` seconds apart (default 0.05 s). The gap matters because a real
session runs actions seconds apart, and the kernel's cost of moving a process into a cgroup
depends on the time since the previous move. Each process is killed and reaped after
``track()``. The script times ``child_setup()``, ``track()`` and ``release()``. It times the
``Popen`` call for context only: with a ``preexec_fn`` it forks instead of using vfork, and
the child's move into its cgroup happens before ``Popen`` returns. The ``cgroup`` mechanism
runs twice: with ``child_setup()`` as ``preexec_fn`` (the child joins its cgroup before
exec) and without it (``track()`` moves the running process).

Prints the median, 90th percentile and maximum in microseconds, of wall-clock time and of
the calling thread's CPU time (which excludes waiting, for example on a loaded host). Needs
root for ``cgroup``.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from typing import Callable, Optional

from openjd.sessions._proctree import CGROUP, PROCESS_GROUP, SessionProcesses


class Stopwatch:
    """Wall-clock and thread CPU time of one step, in microseconds."""

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.cpu = time.thread_time()

    def stop(self, times: dict[str, list[float]], name: str) -> None:
        times[name].append((time.perf_counter() - self.wall) * 1e6)
        times[name + " cpu"].append((time.thread_time() - self.cpu) * 1e6)


def measure(mechanism: str, use_child_setup: bool, actions: int, gap: float) -> dict[str, list[float]]:
    """Return the measured microseconds per step for ``actions`` actions."""
    processes = SessionProcesses("benchmark", mechanism)
    if processes.mechanism != mechanism:
        processes.close()
        raise RuntimeError(f"mechanism {mechanism} is not available here")
    steps = ("child_setup", "Popen", "track", "release")
    times: dict[str, list[float]] = {name: [] for step in steps for name in (step, step + " cpu")}
    try:
        for _ in range(actions):
            time.sleep(gap)
            watch = Stopwatch()
            preexec: Optional[Callable[[], None]] = processes.child_setup() if use_child_setup else None
            watch.stop(times, "child_setup")

            watch = Stopwatch()
            child = subprocess.Popen(["/bin/sleep", "10"], start_new_session=True, preexec_fn=preexec)
            watch.stop(times, "Popen")
            watch = Stopwatch()
            action = processes.track(child.pid)
            watch.stop(times, "track")
            if action.mechanism != mechanism:
                raise RuntimeError(f"pid {child.pid} fell back to {action.mechanism}")

            child.kill()
            child.wait()
            watch = Stopwatch()
            action.release()
            watch.stop(times, "release")
    finally:
        processes.kill_all()
        processes.close()
    return times


def summarize(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]
    return f"median {statistics.median(ordered):8.1f}  p90 {p90:8.1f}  max {ordered[-1]:8.1f}"


def main() -> None:
    actions = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    gap = float(sys.argv[2]) if len(sys.argv) > 2 else 0.05
    print(f"{actions} actions, {gap} s apart; microseconds per action")

    runs = [(CGROUP, True), (CGROUP, False), (PROCESS_GROUP, False)]
    for mechanism, use_child_setup in runs:
        label = f"{mechanism}{' + child_setup' if use_child_setup else ''}"
        try:
            times = measure(mechanism, use_child_setup, actions, gap)
        except RuntimeError as err:
            print(f"{label}: skipped ({err})")
            continue
        print(f"{label}:")
        print(f"  {'Popen':<16} {summarize(times['Popen'])}  (context, not in the totals)")
        for suffix in ("", " cpu"):
            for name in ("child_setup", "track", "release"):
                print(f"  {name + suffix:<16} {summarize(times[name + suffix])}")
            steps = zip(times["child_setup" + suffix], times["track" + suffix], times["release" + suffix])
            print(f"  {'total' + suffix:<16} {summarize([sum(step) for step in steps])}")


if __name__ == "__main__":
    main()
