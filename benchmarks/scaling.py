"""Measure the per-task cost of the runner's backends next to a single Session.

Runs trivial tasks (``true`` on POSIX, else ``python -c pass``) in four ways:

``single-session``
    The public API in this process: one Session, ``run_task`` after ``run_task``. It has
    no runner, so it is the floor for the others.
``--workers 1``, ``--workers 2``, ``--cluster local:2``
    ``openjd-sessions run`` as a child process with ``--output json`` to /dev/null.

Each way runs a job of ``--tasks`` tasks (400 by default) and a job of a tenth as many,
``--rounds`` times. The report gives the median wall time of the big job, its time per
task, and the marginal time per task: the difference between the two jobs divided by
the difference in tasks. The marginal time leaves out fixed costs such as starting
Python, importing Dask or starting a cluster, so it shows what one more task costs.

Usage: ``python benchmarks/scaling.py [--tasks 400] [--rounds 3] [--json PATH]``.
Run it with the project's interpreter, which needs the dask extra for ``--cluster``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional

import yaml
from openjd.model import (
    StepParameterSpaceIterator,
    create_job,
    decode_job_template,
    preprocess_job_parameters,
)

from openjd.sessions import ActionState, ActionStatus, Session

RUNNER = [sys.executable, "-m", "openjd.sessions._runner.cli", "run"]
RUNNER_MODES = {
    "--workers 1": ["--workers", "1"],
    "--workers 2": ["--workers", "2"],
    "--cluster local:2": ["--cluster", "local:2"],
}
# A run that takes longer than this is stopped and the benchmark fails.
RUN_TIMEOUT_SECONDS = 900


def trivial_command() -> list[str]:
    true_path = shutil.which("true") if os.name == "posix" else None
    return [true_path] if true_path else [sys.executable, "-c", "pass"]


def job_template(task_count: int) -> dict[str, Any]:
    command = trivial_command()
    return {
        "specificationVersion": "jobtemplate-2023-09",
        "name": "ScalingBenchmark",
        "steps": [
            {
                "name": "Trivial",
                "parameterSpace": {
                    "taskParameterDefinitions": [{"name": "N", "type": "INT", "range": f"1-{task_count}"}]
                },
                "script": {"actions": {"onRun": _action(command)}},
            }
        ],
    }


def _action(command: list[str]) -> dict[str, Any]:
    # A template rejects an empty args list, so leave the key out when there are none.
    return {"command": command[0], "args": command[1:]} if len(command) > 1 else {"command": command[0]}


def write_template(directory: Path, task_count: int) -> Path:
    path = directory / f"job-{task_count}.yaml"
    path.write_text(yaml.safe_dump(job_template(task_count)), encoding="utf-8")
    return path


def time_single_session(template_path: Path) -> float:
    """Run every task of the template in one Session of this process; return the seconds."""
    template = decode_job_template(template=yaml.safe_load(template_path.read_text(encoding="utf-8")))
    values = preprocess_job_parameters(
        job_template=template,
        job_parameter_values={},
        job_template_dir=template_path.parent,
        current_working_dir=template_path.parent,
    )
    step = create_job(job_template=template, job_parameter_values=values).steps[0]
    finished = threading.Event()
    states: list[ActionState] = []

    def callback(session_id: str, status: ActionStatus) -> None:
        if status.state != ActionState.RUNNING:
            states.append(status.state)
            finished.set()

    started = time.perf_counter()
    session = Session(session_id="scaling-benchmark", job_parameter_values=values, callback=callback)
    try:
        for parameters in StepParameterSpaceIterator(space=step.parameterSpace):
            finished.clear()
            session.run_task(step_script=step.script, task_parameter_values=parameters)
            finished.wait()
    finally:
        session.cleanup()
    elapsed = time.perf_counter() - started
    failed = [state for state in states if state != ActionState.SUCCESS]
    if failed:
        raise RuntimeError(f"{len(failed)} tasks of the single-session run did not succeed: {failed[:3]}")
    return elapsed


def time_runner(template_path: Path, options: Sequence[str]) -> float:
    """Run the template with ``openjd-sessions run`` and return the wall time in seconds."""
    started = time.perf_counter()
    completed = subprocess.run(
        [*RUNNER, str(template_path), *options, "--output", "json"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=RUN_TIMEOUT_SECONDS,
        cwd=template_path.parent,
    )
    elapsed = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"openjd-sessions run {' '.join(options)} failed:\n{completed.stderr[-3000:]}")
    return elapsed


def measure(
    modes: dict[str, Callable[[Path], float]], big: Path, small: Path, rounds: int
) -> dict[str, dict[str, list[float]]]:
    """Time each mode on both templates, alternating the mode order between rounds."""
    times: dict[str, dict[str, list[float]]] = {name: {"big": [], "small": []} for name in modes}
    names = list(modes)
    for round_number in range(rounds):
        order = names if round_number % 2 == 0 else list(reversed(names))
        for name in order:
            for size, path in (("small", small), ("big", big)):
                seconds = modes[name](path)
                times[name][size].append(seconds)
                print(f"round {round_number + 1}/{rounds} {name:<20} {size:<5} {seconds:8.2f} s", flush=True)
    return times


def summarize(times: dict[str, dict[str, list[float]]], big_count: int, small_count: int) -> list[dict[str, Any]]:
    rows = []
    for name, samples in times.items():
        big = statistics.median(samples["big"])
        small = statistics.median(samples["small"])
        rows.append(
            {
                "mode": name,
                "wall_seconds": round(big, 3),
                "per_task_ms": round(1000 * big / big_count, 2),
                "marginal_per_task_ms": round(1000 * (big - small) / (big_count - small_count), 2),
            }
        )
    floor = rows[0]["marginal_per_task_ms"]
    for row in rows:
        row["marginal_vs_single_session"] = round(row["marginal_per_task_ms"] / floor, 2) if floor > 0 else None
    return rows


def print_table(rows: list[dict[str, Any]], big_count: int) -> None:
    print()
    print(f"| Mode | Wall time, {big_count} tasks | Per task | Marginal per task | Marginal vs single Session |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['mode']} | {row['wall_seconds']:.2f} s | {row['per_task_ms']:.1f} ms "
            f"| {row['marginal_per_task_ms']:.1f} ms | {row['marginal_vs_single_session']}x |"
        )


def describe_machine() -> dict[str, Any]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "python": sys.version.split()[0], "platform": sys.platform}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=400, help="tasks of the big job (default: 400)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each mode and job size (default: 3)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--no-dask", action="store_true", help="leave out --cluster local:2")
    args = parser.parse_args(argv)
    small_count = max(1, args.tasks // 10)
    if args.tasks <= small_count:
        parser.error(f"--tasks is {args.tasks}; it must be at least 2 so that the small job is smaller")

    modes: dict[str, Callable[[Path], float]] = {"single session": time_single_session}
    for name, options in RUNNER_MODES.items():
        if args.no_dask and "--cluster" in options:
            continue
        modes[name] = lambda path, options=options: time_runner(path, options)

    with tempfile.TemporaryDirectory(prefix="openjd-scaling-") as directory:
        big = write_template(Path(directory), args.tasks)
        small = write_template(Path(directory), small_count)
        times = measure(modes, big, small, args.rounds)

    rows = summarize(times, args.tasks, small_count)
    print_table(rows, args.tasks)
    machine = describe_machine()
    print(f"\nMachine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}, {machine['platform']}.")
    if args.json is not None:
        document = {"tasks": args.tasks, "small_tasks": small_count, "rounds": args.rounds, "machine": machine}
        document.update(rows=rows, samples=times)
        args.json.write_text(json.dumps(document, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
