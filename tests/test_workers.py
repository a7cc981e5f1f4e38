"""Run one job in several Sessions with ``openjd-sessions run --workers N``.

The scenario functions here take the runner options that pick the backend, so
``test_dask.py`` runs the same scenarios on a Dask cluster. Every test starts the runner
as a real process with ``--output json`` and reads the events: each log and action event
names the worker that owns the session.
"""

from __future__ import annotations

import gzip
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Optional

import pytest
import yaml

# Generous limits that only guard against hangs.
RUN_TIMEOUT_SECONDS = 180
MARKER_TIMEOUT_SECONDS = 90

RUNNER = (sys.executable, "-m", "openjd.sessions._runner.cli", "run")
REPOSITORY = Path(__file__).resolve().parent.parent
RENDER_TEMPLATE = REPOSITORY / "examples" / "render" / "job.yaml"

posix_only = pytest.mark.skipif(os.name != "posix", reason="sends POSIX signals to the runner")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


# ----- templates -------------------------------------------------------------------------


def python_action(code: str) -> dict[str, Any]:
    return {"command": sys.executable, "args": ["-c", code]}


def marked_environment(name: str, marker: str) -> dict[str, Any]:
    """An environment whose onEnter and onExit print ``ENTER-<marker>`` and ``EXIT-<marker>``."""
    actions = {"onEnter": python_action(f"print('ENTER-{marker}')"), "onExit": python_action(f"print('EXIT-{marker}')")}
    return {"name": name, "script": {"actions": actions}}


def task_step(name: str, code: str, count: int, **extra: Any) -> dict[str, Any]:
    """A step with ``count`` tasks whose INT parameter ``N`` runs from 1 to ``count``."""
    return {
        "name": name,
        "parameterSpace": {"taskParameterDefinitions": [{"name": "N", "type": "INT", "range": f"1-{count}"}]},
        "script": {"actions": {"onRun": python_action(code)}},
        **extra,
    }


def write_job(tmp_path: Path, steps: list[dict[str, Any]], **extra: Any) -> Path:
    template = {"specificationVersion": "jobtemplate-2023-09", "name": "WorkersTest", "steps": steps, **extra}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(template), encoding="utf-8")
    return path


# ----- running and reading the runner ----------------------------------------------------


class Run:
    """A finished runner process and its JSON events."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode = returncode
        self.stderr = stderr
        self.events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]

    def describe(self) -> str:
        return f"exit status {self.returncode}\nstderr:\n{self.stderr[-4000:]}"

    @property
    def result(self) -> dict[str, Any]:
        return self.events[-1]

    def step_counts(self, step: str) -> dict[str, int]:
        entry = next(item for item in self.result["steps"] if item["step"] == step)
        return {key: entry[key] for key in ("succeeded", "failed", "canceled", "not_run")}

    def final_tasks(self, step: Optional[str] = None) -> list[dict[str, Any]]:
        return [
            event
            for event in self.events
            if event["type"] == "action"
            and event["action"] == "task"
            and event["state"] != "running"
            and step in (None, event["step"])
        ]

    def log_indexes(self, message: str) -> list[int]:
        events = enumerate(self.events)
        return [index for index, event in events if event["type"] == "log" and event["message"] == message]

    def log_workers(self, message: str) -> Counter[str]:
        return Counter(self.events[index]["worker"] for index in self.log_indexes(message))

    def session_workers(self) -> set[str]:
        return {event["worker"] for event in self.events if event["type"] == "session" and event["state"] == "started"}

    def worker_pids(self) -> dict[str, int]:
        return {
            event["worker"]: event["pid"]
            for event in self.events
            if event["type"] == "session" and event["state"] == "started"
        }


def run_runner(args: Sequence[str], cwd: Path) -> Run:
    completed = subprocess.run(
        [*RUNNER, *args, "--output", "json"], cwd=cwd, capture_output=True, text=True, timeout=RUN_TIMEOUT_SECONDS
    )
    return Run(completed.returncode, completed.stdout, completed.stderr)


class LineReader:
    """Collect a process's output lines on a thread so the test can wait for markers."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[Optional[str]] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def wait_for(self, marker: str, count: int = 1) -> list[str]:
        """Wait until ``count`` lines containing ``marker`` have arrived, and return them."""
        found: list[str] = [line for line in self.lines if marker in line]
        deadline = time.monotonic() + MARKER_TIMEOUT_SECONDS
        while len(found) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{count} x {marker!r} not seen; output so far: {self.lines[-50:]}")
            line = self._queue.get(timeout=remaining)
            if line is None:
                raise AssertionError(f"output ended before {count} x {marker!r}; output: {self.lines[-50:]}")
            if marker in line and line not in found:
                found.append(line)
        return found

    def text(self) -> str:
        self._thread.join(RUN_TIMEOUT_SECONDS)
        return "".join(self.lines)

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)


def start_runner(args: Sequence[str], cwd: Path) -> tuple[subprocess.Popen[str], LineReader]:
    process = subprocess.Popen(
        [*RUNNER, *args, "--output", "json"],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    return process, LineReader(process.stdout)


def finish_runner(process: subprocess.Popen[str], reader: LineReader) -> Run:
    try:
        returncode = process.wait(timeout=RUN_TIMEOUT_SECONDS)
    finally:
        process.kill()
    assert process.stderr is not None
    return Run(returncode, reader.text(), process.stderr.read())


# ----- scenarios shared with test_dask.py ------------------------------------------------


def check_each_task_runs_once(backend_args: Sequence[str], tmp_path: Path) -> Run:
    code = "import time; time.sleep(0.2); print('TASK-{{Task.Param.N}}')"
    path = write_job(tmp_path, [task_step("Work", code, 12)])

    run = run_runner([str(path), *backend_args], tmp_path)

    assert run.returncode == 0, run.describe()
    finals = run.final_tasks()
    assert sorted(int(event["task"]["N"]) for event in finals) == list(range(1, 13))
    assert {event["state"] for event in finals} == {"success"}
    for number in range(1, 13):
        assert len(run.log_indexes(f"TASK-{number}")) == 1, f"TASK-{number}"
    assert len({event["worker"] for event in finals}) >= 2
    assert run.result["task_reruns"] == 0
    return run


def check_environments_once_per_worker(backend_args: Sequence[str], tmp_path: Path) -> Run:
    code = "import time; time.sleep(0.2); print('TASK-{{Task.Param.N}}')"
    path = write_job(
        tmp_path,
        [task_step("Work", code, 8, stepEnvironments=[marked_environment("StepEnv", "STEP")])],
        jobEnvironments=[marked_environment("JobEnv", "JOB")],
    )

    run = run_runner([str(path), *backend_args], tmp_path)

    assert run.returncode == 0, run.describe()
    task_workers = {event["worker"] for event in run.final_tasks()}
    assert len(task_workers) >= 2
    for worker in run.session_workers():
        assert run.log_workers("ENTER-JOB")[worker] == 1, worker
        assert run.log_workers("EXIT-JOB")[worker] == 1, worker
    for worker in task_workers:
        assert run.log_workers("ENTER-STEP")[worker] == 1, worker
        assert run.log_workers("EXIT-STEP")[worker] == 1, worker
        _assert_worker_order(run, worker, ["ENTER-JOB", "ENTER-STEP", "TASK-", "EXIT-STEP", "EXIT-JOB"])
    return run


def _assert_worker_order(run: Run, worker: str, prefixes: list[str]) -> None:
    """Check that the worker's log lines with these prefixes come in this order."""
    seen = [
        prefix
        for event in run.events
        if event["type"] == "log" and event["worker"] == worker
        for prefix in prefixes
        if event["message"].startswith(prefix)
    ]
    collapsed = [prefix for index, prefix in enumerate(seen) if index == 0 or seen[index - 1] != prefix]
    assert collapsed == prefixes, f"{worker}: {seen}"


def check_step_waits_for_dependency(backend_args: Sequence[str], tmp_path: Path) -> Run:
    code = "import time; time.sleep(0.3); print('TASK-{{Task.Param.N}}')"
    path = write_job(
        tmp_path,
        [
            task_step("Second", code, 2, dependencies=[{"dependsOn": "First"}]),
            task_step("First", code, 4),
        ],
    )

    run = run_runner([str(path), *backend_args], tmp_path)

    assert run.returncode == 0, run.describe()
    first_ends = [index for index, event in enumerate(run.events) if event in run.final_tasks("First")]
    second_starts = [
        index
        for index, event in enumerate(run.events)
        if event["type"] == "action" and event["step"] == "Second" and event["state"] == "running"
    ]
    assert len(first_ends) == 4
    assert second_starts
    assert max(first_ends) < min(second_starts)
    assert run.step_counts("Second") == {"succeeded": 2, "failed": 0, "canceled": 0, "not_run": 0}
    return run


def check_failing_task_stops_job(backend_args: Sequence[str], tmp_path: Path) -> Run:
    code = (
        "import sys, time; n = {{Task.Param.N}}; print('TASK-STARTED', n, flush=True); "
        "time.sleep(0 if n == 1 else 1); sys.exit(3 if n == 1 else 0)"
    )
    path = write_job(tmp_path, [task_step("Work", code, 8)], jobEnvironments=[marked_environment("JobEnv", "JOB")])

    run = run_runner([str(path), *backend_args], tmp_path)

    assert run.returncode == 1, run.describe()
    counts = run.step_counts("Work")
    assert counts["failed"] == 1
    assert counts["not_run"] >= 1
    assert sum(counts.values()) == 8
    assert run.result["result"] == "failed"
    for worker in run.session_workers():
        assert run.log_workers("EXIT-JOB")[worker] == 1, worker
    return run


def check_failure_cancels_running(backend_args: Sequence[str], tmp_path: Path) -> Run:
    code = (
        "import sys, time; n = {{Task.Param.N}}; print('TASK-STARTED', n, flush=True); "
        "time.sleep(1 if n == 1 else 120); sys.exit(3)"
    )
    path = write_job(tmp_path, [task_step("Work", code, 4)], jobEnvironments=[marked_environment("JobEnv", "JOB")])

    run = run_runner([str(path), "--on-failure", "cancel", *backend_args], tmp_path)

    assert run.returncode == 1, run.describe()
    counts = run.step_counts("Work")
    assert counts["failed"] == 1
    assert counts["canceled"] >= 1
    assert counts["succeeded"] == 0
    for worker in run.session_workers():
        assert run.log_workers("EXIT-JOB")[worker] == 1, worker
    return run


def check_cancel_while_tasks_run(backend_args: Sequence[str], tmp_path: Path) -> Run:
    code = "import time; print('TASK-STARTED', {{Task.Param.N}}, flush=True); time.sleep(120)"
    path = write_job(tmp_path, [task_step("Work", code, 6)], jobEnvironments=[marked_environment("JobEnv", "JOB")])

    process, reader = start_runner([str(path), *backend_args], tmp_path)
    reader.wait_for("TASK-STARTED", count=2)
    process.send_signal(signal.SIGINT)
    run = finish_runner(process, reader)

    assert run.returncode == 130, run.describe()
    counts = run.step_counts("Work")
    assert counts == {"succeeded": 0, "failed": 0, "canceled": 2, "not_run": 4}
    assert len({event["worker"] for event in run.final_tasks()}) == 2
    for worker in run.session_workers():
        assert run.log_workers("EXIT-JOB")[worker] == 1, worker
    assert run.result["result"] == "canceled"
    return run


def check_render_matches_single_session(backend_args: Sequence[str], tmp_path: Path) -> None:
    outputs = {}
    for name, extra in (("single", []), ("scaled", list(backend_args))):
        output_dir = tmp_path / name
        output_dir.mkdir()
        args = [str(RENDER_TEMPLATE), "-p", f"Python={sys.executable}", "-p", f"OutputDir={output_dir}", *extra]
        run = run_runner(args, tmp_path)
        assert run.returncode == 0, run.describe()
        outputs[name] = {path.name: _content(path) for path in sorted(output_dir.iterdir())}

    assert sorted(outputs["scaled"]) == sorted(outputs["single"])
    assert len(outputs["single"]) == 11
    assert outputs["scaled"] == outputs["single"]


def _content(path: Path) -> bytes:
    # A gzip header contains the time of writing, so compare what it contains.
    return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()


# ----- tests of --workers ----------------------------------------------------------------

WORKERS = ["--workers", "3"]


def test_workers_run_each_task_once(tmp_path: Path) -> None:
    run = check_each_task_runs_once(WORKERS, tmp_path)
    assert sorted(run.result["workers"]) == ["local-1", "local-2", "local-3"]


def test_workers_enter_environments_once(tmp_path: Path) -> None:
    run = check_environments_once_per_worker(WORKERS, tmp_path)
    # Local workers enter the job environments when the job starts, task or not.
    assert run.session_workers() == {"local-1", "local-2", "local-3"}


def test_workers_respect_step_dependencies(tmp_path: Path) -> None:
    check_step_waits_for_dependency(WORKERS, tmp_path)


def test_workers_failing_task_stops_job(tmp_path: Path) -> None:
    run = check_failing_task_stops_job(["--workers", "2"], tmp_path)
    # Task 2 started with task 1 and finishes, because of --on-failure finish. No other task starts.
    assert run.step_counts("Work") == {"succeeded": 1, "failed": 1, "canceled": 0, "not_run": 6}


def test_workers_failure_cancels_running(tmp_path: Path) -> None:
    run = check_failure_cancels_running(["--workers", "2"], tmp_path)
    assert run.step_counts("Work") == {"succeeded": 0, "failed": 1, "canceled": 1, "not_run": 2}


@posix_only
def test_workers_cancel_while_running(tmp_path: Path) -> None:
    check_cancel_while_tasks_run(["--workers", "2"], tmp_path)


@pytest.mark.slow
def test_workers_render_matches_single(tmp_path: Path) -> None:
    check_render_matches_single_session(["--workers", "2"], tmp_path)


def test_workers_one_matches_default(tmp_path: Path) -> None:
    code = "print('TASK-{{Task.Param.N}}')"
    path = write_job(
        tmp_path,
        [
            task_step("Second", code, 2, dependencies=[{"dependsOn": "First"}]),
            task_step("First", code, 2, stepEnvironments=[marked_environment("StepEnv", "STEP")]),
            task_step("Independent", code, 1),
        ],
        jobEnvironments=[marked_environment("JobEnv", "JOB")],
    )

    default = run_runner([str(path)], tmp_path)
    one = run_runner([str(path), "--workers", "1"], tmp_path)

    assert default.returncode == 0, default.describe()
    assert one.returncode == 0, one.describe()
    assert _action_sequence(one) == _action_sequence(default)
    assert _marker_lines(one) == _marker_lines(default)
    assert _marker_lines(one)[:3] == ["ENTER-JOB", "ENTER-STEP", "TASK-1"]


def _marker_lines(run: Run) -> list[str]:
    markers = ("ENTER-", "EXIT-", "TASK-")
    return [event["message"] for event in run.events if event["type"] == "log" and event["message"].startswith(markers)]


def _action_sequence(run: Run) -> list[tuple[Any, ...]]:
    keep = ("type", "action", "step", "environment", "task", "state")
    return [
        tuple(event.get(key) for key in keep) for event in run.events if event["type"] in ("action", "step", "session")
    ]


def test_workers_option_rejects_cluster(tmp_path: Path) -> None:
    path = write_job(tmp_path, [task_step("Work", "pass", 1)])

    run = run_runner([str(path), "--workers", "2", "--cluster", "local:2"], tmp_path)

    assert run.returncode == 2
    assert "cannot be combined with --cluster" in run.stderr


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_workers_option_invalid_count(tmp_path: Path, value: str) -> None:
    path = write_job(tmp_path, [task_step("Work", "pass", 1)])

    run = run_runner([str(path), "--workers", value], tmp_path)

    assert run.returncode == 2
    assert f"argument --workers: invalid value {value!r}" in run.stderr or "expected 1 or more" in run.stderr


def test_cluster_option_without_dask(tmp_path: Path) -> None:
    # A package named distributed that fails to import acts as a missing install.
    fake = tmp_path / "fake" / "distributed"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('distributed is not installed here')\n", encoding="utf-8")
    path = write_job(tmp_path, [task_step("Work", "pass", 1)])
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake.parent), str(REPOSITORY / "src")])}

    completed = subprocess.run(
        [*RUNNER, str(path), "--cluster", "local:2"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_SECONDS,
    )

    assert completed.returncode == 2
    assert "pip install 'openjd-sessions[dask]'" in completed.stderr
    assert "Traceback" not in completed.stderr


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("local:0", "local:N needs a worker count of 1 or more"),
        ("http://host:8786", "expected local:N, tcp://HOST:PORT or tls://HOST:PORT"),
        ("tcp://host", "expected local:N, tcp://HOST:PORT or tls://HOST:PORT"),
    ],
)
def test_cluster_option_invalid_value(tmp_path: Path, value: str, expected: str) -> None:
    path = write_job(tmp_path, [task_step("Work", "pass", 1)])

    run = run_runner([str(path), "--cluster", value], tmp_path)

    assert run.returncode == 2
    assert expected in run.stderr


# ----- the reaper that kills what a dead cluster worker left running ---------------------

FAKE_WORKER = """
import subprocess, sys, time
from openjd.sessions._runner.containment import guard_worker_process

guard = guard_worker_process(use_cgroup={use_cgroup})
# A grandchild in a session of its own, as an action and its descendants are.
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
print(child.pid, guard.cgroup, flush=True)
time.sleep(300)
"""


def _cgroup_available() -> bool:
    from openjd.sessions._runner.containment import find_own_cgroup_dir

    directory, _ = find_own_cgroup_dir()
    return directory is not None and os.access(os.path.join(directory, "cgroup.procs"), os.W_OK)


def is_running(pid: int) -> bool:
    """False once the process has exited, even while it waits as a zombie for its parent."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as file:
            return file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until(condition: Any, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())


@linux_only
@pytest.mark.parametrize("use_cgroup", [True, False], ids=["cgroup", "marker"])
def test_reaper_kills_worker_leftovers(use_cgroup: bool) -> None:
    if use_cgroup and not _cgroup_available():
        pytest.skip("needs a writable cgroup v2, as root or in a delegated subtree")
    worker = subprocess.Popen(
        [sys.executable, "-c", FAKE_WORKER.format(use_cgroup=use_cgroup)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert worker.stdout is not None
        child_text, cgroup = worker.stdout.readline().split()
        child = int(child_text)
        assert is_running(child)

        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=RUN_TIMEOUT_SECONDS)

        assert wait_until(lambda: not is_running(child)), f"process {child} outlived its worker"
        if use_cgroup:
            assert cgroup != "None"
            assert wait_until(lambda: not os.path.exists(cgroup)), f"{cgroup} was not removed"
    finally:
        worker.kill()
