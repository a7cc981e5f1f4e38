"""Print where the time of one action goes, step by step, as medians over many actions.

    python3 benchmarks/timeline.py task      # run_task() of /bin/true to its final callback
    python3 benchmarks/timeline.py cancel    # cancel_action() on sleep 60 to its final callback

Runs in the `ours` venv that benchmarks/run.py builds. It wraps internal methods of
openjd.sessions with timestamps, so it depends on private names and adds a few
microseconds per step. Use it to see the order and size of the steps, not for totals.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
OURS_PYTHON = HERE / ".venvs" / "ours" / "bin" / "python"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload", choices=("task", "cancel"))
    parser.add_argument("--count", type=int, default=200, help="actions to time (default 200)")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.inside:
        if not OURS_PYTHON.exists():
            print(f"Missing {OURS_PYTHON}: run python3 benchmarks/run.py once first, which builds it.", file=sys.stderr)
            return 2
        command = [str(OURS_PYTHON), __file__, args.workload, "--count", str(args.count), "--inside"]
        return subprocess.call(command)
    sys.path.insert(0, str(HERE))
    return measure(args.workload, args.count)


def measure(workload: str, count: int) -> int:
    from _bench_lib import step_script

    from openjd.sessions import ActionState, Session, _action, _process, _proctree

    marks: list[tuple[str, float]] = []

    def wrap(owner: Any, name: str, label: str) -> None:
        original: Callable[..., Any] = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            marks.append((label + " begins", time.perf_counter()))
            try:
                return original(*args, **kwargs)
            finally:
                marks.append((label + " ends", time.perf_counter()))

        setattr(owner, name, timed)

    wrap(_action.ActionRunner, "start", "ActionRunner.start")
    wrap(_process.ActionProcess, "__init__", "spawn (ActionProcess)")
    wrap(_action.ActionRunner, "_run", "action thread")
    wrap(_action.ActionRunner, "_terminate", "terminate")
    wrap(_process.ActionProcess, "kill_tree", "kill_tree")
    wrap(_process.ActionProcess, "_reap", "reap")
    wrap(_process.ActionProcess, "close", "close")
    wrap(_proctree.ActionProcesses, "release", "release cgroup")
    wrap(_action.ActionRunner, "_finish", "finish")
    wrap(_action, "prepare_standby", "start standby shells")

    finished = threading.Event()

    def callback(_: str, status: Any) -> None:
        if status.state != ActionState.RUNNING:
            marks.append(("final callback", time.perf_counter()))
            finished.set()

    timings: dict[str, list[float]] = {}
    session = Session(session_id="timeline", job_parameter_values={}, callback=callback)
    script = step_script("/bin/true") if workload == "task" else step_script("/bin/sleep", ["60"])
    for _ in range(count):
        finished.clear()
        if workload == "task":
            marks.clear()
            marks.append(("run_task() called", time.perf_counter()))
            session.run_task(step_script=script, task_parameter_values={})
        else:
            session.run_task(step_script=script, task_parameter_values={})
            time.sleep(0.03)
            marks.clear()
            marks.append(("cancel_action() called", time.perf_counter()))
            session.cancel_action()
        finished.wait(30)
        time.sleep(0.002)  # Let the action's thread finish what it does after the callback.
        start = marks[0][1]
        seen: dict[str, int] = {}
        for label, moment in marks:
            seen[label] = seen.get(label, 0) + 1
            key = label if seen[label] == 1 else f"{label} ({seen[label]})"
            timings.setdefault(key, []).append((moment - start) * 1000)
        if workload == "cancel":
            session.cleanup()
            session = Session(session_id="timeline", job_parameter_values={}, callback=callback)
    session.cleanup()

    print(f"{workload}: median ms after the call, over {count} actions (n = actions that had the step)")
    for key, values in sorted(timings.items(), key=lambda item: statistics.median(item[1])):
        print(f"  {statistics.median(values):7.3f}  {key}  (n={len(values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
