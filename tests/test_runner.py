"""Run ``openjd-sessions run`` as a real process on small templates written for each test."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Optional

import pytest
import yaml

# Generous limits that only guard against hangs.
RUN_TIMEOUT_SECONDS = 120
MARKER_TIMEOUT_SECONDS = 60

RUNNER = (sys.executable, "-m", "openjd.sessions._runner.cli", "run")

posix_only = pytest.mark.skipif(os.name != "posix", reason="sends POSIX signals to the runner")


def python_action(code: str, **extra: Any) -> dict[str, Any]:
    """An action that runs ``code`` with the test interpreter."""
    return {"command": sys.executable, "args": ["-c", code], **extra}


def print_action(text: str) -> dict[str, Any]:
    return python_action(f"print({text!r})")


def marked_environment(name: str, marker: str, **extra: Any) -> dict[str, Any]:
    """An environment whose onEnter and onExit print ``ENTER-<marker>`` and ``EXIT-<marker>``."""
    actions = {"onEnter": print_action(f"ENTER-{marker}"), "onExit": print_action(f"EXIT-{marker}")}
    return {"name": name, "script": {"actions": actions}, **extra}


def job_template(steps: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"specificationVersion": "jobtemplate-2023-09", "name": "RunnerTest", "steps": steps, **extra}


def step(name: str, on_run: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": name, "script": {"actions": {"onRun": on_run}}, **extra}


def write_yaml(path: Path, document: Any) -> Path:
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def run_runner(args: Sequence[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RUNNER, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_SECONDS,
    )


def json_events(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines()]


def final_task_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == "action" and e["action"] == "task" and e["state"] != "running"]


def output_lines(stdout: str) -> list[str]:
    return [line.strip() for line in stdout.splitlines()]


class LineReader:
    """Collect a process's output lines on a thread so the test can wait for a marker."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[Optional[str]] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def wait_for(self, marker: str) -> None:
        deadline = time.monotonic() + MARKER_TIMEOUT_SECONDS
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{marker!r} not seen; output so far: {self.lines}")
            line = self._queue.get(timeout=remaining)
            if line is None:
                raise AssertionError(f"output ended before {marker!r}; output: {self.lines}")
            if marker in line:
                return

    def text(self) -> str:
        self._thread.join(RUN_TIMEOUT_SECONDS)
        return "".join(self.lines)

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)


@pytest.fixture
def two_step_job(tmp_path: Path) -> Path:
    """Job with environment ``JOB`` and step ``Second``, which depends on ``First`` with environment ``STEP``."""
    template = job_template(
        [
            step(
                "Second",
                print_action("TASK-Second"),
                dependencies=[{"dependsOn": "First"}],
            ),
            step(
                "First",
                print_action("TASK-First"),
                stepEnvironments=[marked_environment("StepEnv", "STEP")],
            ),
        ],
        jobEnvironments=[marked_environment("JobEnv", "JOB")],
    )
    return write_yaml(tmp_path / "job.yaml", template)


def test_run_all_steps_in_dependency_order(two_step_job: Path, tmp_path: Path) -> None:
    completed = run_runner([str(two_step_job)], tmp_path)

    assert completed.returncode == 0, completed.stderr
    lines = output_lines(completed.stdout)
    expected = ["ENTER-JOB", "ENTER-STEP", "TASK-First", "EXIT-STEP", "TASK-Second", "EXIT-JOB"]
    assert [line for line in lines if line in expected] == expected
    assert "Job 'RunnerTest': success" in completed.stderr


def test_failing_task_still_exits_environments(tmp_path: Path) -> None:
    template = job_template(
        [
            step(
                "Fails",
                python_action("import sys; print('TASK-RAN'); sys.exit(3)"),
                stepEnvironments=[marked_environment("StepEnv", "STEP")],
                parameterSpace={"taskParameterDefinitions": [{"name": "N", "type": "INT", "range": "1-3"}]},
            ),
            step("Later", print_action("TASK-Later"), dependencies=[{"dependsOn": "Fails"}]),
        ],
        jobEnvironments=[marked_environment("JobEnv", "JOB")],
    )
    path = write_yaml(tmp_path / "job.yaml", template)

    completed = run_runner([str(path)], tmp_path)

    assert completed.returncode == 1
    lines = output_lines(completed.stdout)
    assert lines.count("TASK-RAN") == 1
    assert "TASK-Later" not in lines
    assert lines.index("EXIT-STEP") < lines.index("EXIT-JOB")
    assert "0/3 tasks succeeded, 1 failed, 0 canceled, 2 not run" in completed.stderr
    assert "Job 'RunnerTest': failed" in completed.stderr


def test_failing_environment_enter_skips_steps(tmp_path: Path) -> None:
    environment = marked_environment("Broken", "BROKEN")
    environment["script"]["actions"]["onEnter"] = python_action("import sys; sys.exit(5)")
    template = job_template([step("Never", print_action("TASK-Never"))], jobEnvironments=[environment])
    path = write_yaml(tmp_path / "job.yaml", template)

    completed = run_runner([str(path), "--output", "json"], tmp_path)

    assert completed.returncode == 1
    events = json_events(completed.stdout)
    assert final_task_events(events) == []
    exits = [e for e in events if e["type"] == "action" and e["action"] == "exit" and e["state"] != "running"]
    assert [(e["environment"], e["state"]) for e in exits] == [("Broken", "success")]
    assert events[-1]["environments_failed"] == ["enter Broken: failed"]


def test_step_option_runs_one_step(two_step_job: Path, tmp_path: Path) -> None:
    completed = run_runner([str(two_step_job), "--step", "Second"], tmp_path)

    assert completed.returncode == 0, completed.stderr
    lines = output_lines(completed.stdout)
    assert "TASK-Second" in lines
    assert "TASK-First" not in lines
    assert "ENTER-STEP" not in lines
    assert lines.index("ENTER-JOB") < lines.index("TASK-Second") < lines.index("EXIT-JOB")


def test_step_option_unknown_name(two_step_job: Path, tmp_path: Path) -> None:
    completed = run_runner([str(two_step_job), "--step", "Missing"], tmp_path)

    assert completed.returncode == 2
    assert "no step named 'Missing'" in completed.stderr
    assert "'Second', 'First'" in completed.stderr


@pytest.fixture
def parameter_job(tmp_path: Path) -> Path:
    template = job_template(
        [step("Show", print_action("VALUES {{Param.A}} {{Param.B}} {{Param.C}}"))],
        parameterDefinitions=[
            {"name": "A", "type": "STRING"},
            {"name": "B", "type": "INT", "default": 1},
            {"name": "C", "type": "STRING", "default": "c-default"},
        ],
    )
    return write_yaml(tmp_path / "job.yaml", template)


def test_job_parameters_from_arguments(parameter_job: Path, tmp_path: Path) -> None:
    completed = run_runner([str(parameter_job), "-p", "A=x=y", "-p", "B=7"], tmp_path)

    assert completed.returncode == 0, completed.stderr
    assert "VALUES x=y 7 c-default" in output_lines(completed.stdout)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_job_parameters_from_file(parameter_job: Path, tmp_path: Path, suffix: str) -> None:
    values = {"A": "from-file", "B": 42, "C": "file-c"}
    parameter_file = tmp_path / f"params{suffix}"
    parameter_file.write_text(json.dumps(values) if suffix == ".json" else yaml.safe_dump(values))

    # A later -p value overrides the file's value for the same name.
    completed = run_runner([str(parameter_job), "-p", f"file://{parameter_file.name}", "-p", "C=cli-c"], tmp_path)

    assert completed.returncode == 0, completed.stderr
    assert "VALUES from-file 42 cli-c" in output_lines(completed.stdout)


def test_json_output_lines_and_events(two_step_job: Path, tmp_path: Path) -> None:
    completed = run_runner([str(two_step_job), "--output", "json"], tmp_path)

    assert completed.returncode == 0, completed.stderr
    events = json_events(completed.stdout)
    assert {e["type"] for e in events} == {"session", "step", "action", "log", "result"}
    tasks = final_task_events(events)
    assert [(e["step"], e["state"], e["exit_code"]) for e in tasks] == [
        ("First", "success", 0),
        ("Second", "success", 0),
    ]
    session_id = events[0]["session_id"]
    logs = [e for e in events if e["type"] == "log"]
    assert "TASK-First" in [e["message"] for e in logs]
    assert all(e["session_id"] == session_id for e in logs if e["message"] == "TASK-First")
    assert {"level", "time"} <= set(logs[0])
    assert events[-1]["type"] == "result"
    assert events[-1]["result"] == "success"


def test_json_output_reports_progress(tmp_path: Path) -> None:
    code = "print('openjd_progress: 40', flush=True); print('openjd_status: halfway', flush=True)"
    path = write_yaml(tmp_path / "job.yaml", job_template([step("Report", python_action(code))]))

    completed = run_runner([str(path), "--output", "json"], tmp_path)

    assert completed.returncode == 0, completed.stderr
    running = [e for e in json_events(completed.stdout) if e["type"] == "action" and e["state"] == "running"]
    assert 40.0 in [e["progress"] for e in running]
    assert "halfway" in [e["status_message"] for e in running]


@pytest.mark.parametrize(
    ("file_name", "content", "expected"),
    [
        ("bad.yaml", "specificationVersion: jobtemplate-2023-09\nsteps: [\n", "is not valid YAML"),
        ("bad.json", '{"name": ', "is not valid JSON"),
        ("list.yaml", "- just\n- a list\n", "must contain a mapping"),
        ("invalid.yaml", "specificationVersion: jobtemplate-2023-09\nname: X\nsteps: []\n", "steps:"),
        ("version.yaml", "specificationVersion: jobtemplate-1999\nname: X\n", "specificationVersion"),
    ],
)
def test_template_error_exit_two(tmp_path: Path, file_name: str, content: str, expected: str) -> None:
    (tmp_path / file_name).write_text(content, encoding="utf-8")

    completed = run_runner([file_name], tmp_path)

    assert completed.returncode == 2
    assert expected in completed.stderr
    assert file_name in completed.stderr
    assert "Traceback" not in completed.stderr
    assert completed.stdout == ""


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["missing.yaml"], "missing.yaml was not found"),
        (["job.yaml"], "Values missing for required job parameters: A"),
        (["job.yaml", "-p", "A=1", "-p", "Unknown=2"], "not defined in the template: Unknown"),
        (["job.yaml", "-p", "A=1", "-p", "B=notanint"], "Value (notanint) for parameter B"),
        (["job.yaml", "-p", "novalue"], "expected NAME=VALUE or file://PATH"),
        (["job.yaml", "-p", "file://nothere.yaml"], "nothere.yaml was not found"),
        (["job.yaml", "--environment", "noenv.yaml"], "noenv.yaml was not found"),
    ],
)
def test_input_error_exit_two(parameter_job: Path, tmp_path: Path, args: list[str], expected: str) -> None:
    completed = run_runner(args, tmp_path)

    assert completed.returncode == 2
    assert expected in completed.stderr
    assert "Traceback" not in completed.stderr


@pytest.fixture
def long_task_job(tmp_path: Path) -> Path:
    sleeper = "import time; print('TASK-STARTED', flush=True); time.sleep(60); print('TASK-FINISHED')"
    template = job_template(
        [
            step("Sleep", python_action(sleeper), stepEnvironments=[marked_environment("StepEnv", "STEP")]),
            step("Later", print_action("TASK-Later"), dependencies=[{"dependsOn": "Sleep"}]),
        ],
        jobEnvironments=[marked_environment("JobEnv", "JOB")],
    )
    return write_yaml(tmp_path / "job.yaml", template)


@posix_only
@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_signal_cancels_task_and_exits(long_task_job: Path, tmp_path: Path, signal_number: int) -> None:
    process = subprocess.Popen(
        [*RUNNER, str(long_task_job)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        reader = LineReader(process.stdout)
        reader.wait_for("TASK-STARTED")
        process.send_signal(signal_number)
        returncode = process.wait(timeout=RUN_TIMEOUT_SECONDS)
    finally:
        process.kill()
    assert process.stderr is not None
    stderr = process.stderr.read()

    assert returncode == 128 + signal_number
    lines = output_lines(reader.text())
    assert "TASK-FINISHED" not in lines
    assert "TASK-Later" not in lines
    assert lines.index("EXIT-STEP") < lines.index("EXIT-JOB")
    assert "0/1 tasks succeeded, 0 failed, 1 canceled, 0 not run" in stderr
    assert "Job 'RunnerTest': canceled" in stderr


@posix_only
def test_second_signal_terminates_exit(tmp_path: Path) -> None:
    slow_exit = "import time; print('EXIT-START', flush=True); time.sleep(60); print('EXIT-END')"
    environment = marked_environment("SlowExit", "SLOW")
    environment["script"]["actions"]["onExit"] = python_action(slow_exit)
    sleeper = "import time; print('TASK-STARTED', flush=True); time.sleep(60)"
    template = job_template([step("Sleep", python_action(sleeper))], jobEnvironments=[environment])
    path = write_yaml(tmp_path / "job.yaml", template)

    process = subprocess.Popen(
        [*RUNNER, str(path), "--output", "json"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        reader = LineReader(process.stdout)
        reader.wait_for("TASK-STARTED")
        process.send_signal(signal.SIGINT)
        reader.wait_for("EXIT-START")
        process.send_signal(signal.SIGINT)
        returncode = process.wait(timeout=RUN_TIMEOUT_SECONDS)
    finally:
        process.kill()

    assert returncode == 130
    events = json_events(reader.text())
    messages = [e["message"] for e in events if e["type"] == "log"]
    assert "EXIT-END" not in messages
    final = [(e["action"], e["state"]) for e in events if e["type"] == "action" and e["state"] != "running"]
    assert final == [("enter", "success"), ("task", "canceled"), ("exit", "canceled")]
    assert events[-1]["result"] == "canceled"


@pytest.mark.parametrize("target_runtime", [0, 30])
def test_chunked_step_runs_chunks(tmp_path: Path, target_runtime: int) -> None:
    chunks = {"defaultTaskCount": 4, "rangeConstraint": "CONTIGUOUS", "targetRuntimeSeconds": target_runtime}
    template = job_template(
        [
            step(
                "Chunked",
                print_action("CHUNK {{Task.Param.Frames}}"),
                parameterSpace={
                    "taskParameterDefinitions": [
                        {"name": "Frames", "type": "CHUNK[INT]", "range": "1-12", "chunks": chunks}
                    ]
                },
            )
        ],
        extensions=["TASK_CHUNKING"],
    )
    path = write_yaml(tmp_path / "job.yaml", template)

    completed = run_runner([str(path), "--output", "json"], tmp_path)

    assert completed.returncode == 0, completed.stderr
    events = json_events(completed.stdout)
    assert [e["task"] for e in final_task_events(events)] == [{"Frames": "1-4"}, {"Frames": "5-8"}, {"Frames": "9-12"}]
    messages = [e["message"] for e in events if e["type"] == "log"]
    assert [m for m in messages if m.startswith("CHUNK ")] == ["CHUNK 1-4", "CHUNK 5-8", "CHUNK 9-12"]
    step_started = [e for e in events if e["type"] == "step" and e["state"] == "started"]
    assert step_started[0]["task_count"] == 3


@pytest.fixture
def path_job(tmp_path: Path) -> Path:
    template = job_template(
        [step("Show", print_action("MAPPED {{Param.Dir}}"))],
        parameterDefinitions=[{"name": "Dir", "type": "PATH"}],
    )
    return write_yaml(tmp_path / "job.yaml", template)


@pytest.mark.parametrize("versioned", [False, True])
def test_path_mapping_rules_file(path_job: Path, tmp_path: Path, versioned: bool) -> None:
    rules: Any = [{"source_path_format": "POSIX", "source_path": "/studio/assets", "destination_path": "/mnt/assets"}]
    if versioned:
        rules = {"version": "pathmapping-1.0", "path_mapping_rules": rules}
    (tmp_path / "rules.json").write_text(json.dumps(rules), encoding="utf-8")

    completed = run_runner(
        [str(path_job), "-p", "Dir=/studio/assets/shot1", "--path-mapping-rules", "rules.json"], tmp_path
    )

    assert completed.returncode == 0, completed.stderr
    assert f"MAPPED {Path('/mnt/assets/shot1')}" in output_lines(completed.stdout)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"version": "pathmapping-2.0", "path_mapping_rules": []}', "'pathmapping-2.0'"),
        ('[{"source_path": "/a"}]', "requires the following fields"),
        ("not json", "is not valid JSON"),
    ],
)
def test_path_mapping_rules_invalid(path_job: Path, tmp_path: Path, content: str, expected: str) -> None:
    (tmp_path / "rules.json").write_text(content, encoding="utf-8")

    completed = run_runner([str(path_job), "-p", "Dir=/x", "--path-mapping-rules", "rules.json"], tmp_path)

    assert completed.returncode == 2
    assert expected in completed.stderr
    assert "Traceback" not in completed.stderr


def test_preserve_keeps_working_directory(two_step_job: Path, tmp_path: Path) -> None:
    completed = run_runner([str(two_step_job), "--preserve", "--output", "json"], tmp_path)

    assert completed.returncode == 0, completed.stderr
    prefix = "Kept the session working directory: "
    kept_directories = [line[len(prefix) :] for line in completed.stderr.splitlines() if line.startswith(prefix)]
    assert len(kept_directories) == 1
    try:
        assert Path(kept_directories[0]).is_dir()
        assert json_events(completed.stdout)[-1]["working_directories"] == kept_directories
    finally:
        shutil.rmtree(kept_directories[0], ignore_errors=True)


def test_working_directory_removed_by_default(two_step_job: Path, tmp_path: Path) -> None:
    completed = run_runner([str(two_step_job), "--output", "json"], tmp_path)

    assert completed.returncode == 0, completed.stderr
    directories = json_events(completed.stdout)[-1]["working_directories"]
    assert len(directories) == 1
    assert not Path(directories[0]).exists()
    assert "Kept the session working directory" not in completed.stderr


def test_environment_template_entered_first(two_step_job: Path, tmp_path: Path) -> None:
    environment_template = {
        "specificationVersion": "environment-2023-09",
        "environment": marked_environment("External", "EXTERNAL"),
    }
    write_yaml(tmp_path / "env.yaml", environment_template)

    completed = run_runner([str(two_step_job), "--environment", "env.yaml"], tmp_path)

    assert completed.returncode == 0, completed.stderr
    lines = output_lines(completed.stdout)
    expected = ["ENTER-EXTERNAL", "ENTER-JOB", "TASK-First", "TASK-Second", "EXIT-JOB", "EXIT-EXTERNAL"]
    assert [line for line in lines if line in expected] == expected


def test_redacted_env_extension_enabled(tmp_path: Path) -> None:
    environment = {
        "name": "Secret",
        # The secret is joined at run time so that the logged command line does not contain it.
        "script": {"actions": {"onEnter": python_action("print('openjd_redacted_env: TOKEN=' + 'hun' + 'ter2')")}},
    }
    code = "import os; print('TOKEN-SET' if os.environ.get('TOKEN') == 'hunter2' else 'TOKEN-MISSING')"
    template = job_template(
        [step("Use", python_action(code))], jobEnvironments=[environment], extensions=["REDACTED_ENV_VARS"]
    )
    path = write_yaml(tmp_path / "job.yaml", template)

    completed = run_runner([str(path)], tmp_path)

    assert completed.returncode == 0, completed.stderr
    assert "TOKEN-SET" in output_lines(completed.stdout)
    assert "hunter2" not in completed.stdout


@posix_only
def test_progress_line_on_terminal(two_step_job: Path, tmp_path: Path) -> None:
    import pty

    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen([*RUNNER, str(two_step_job)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=terminal)
        os.close(terminal)
        # Read while the runner writes, because a full terminal buffer would block it.
        chunks: list[bytes] = []
        reader = threading.Thread(target=_read_all, args=(controller, chunks), daemon=True)
        reader.start()
        stdout, _ = process.communicate(timeout=RUN_TIMEOUT_SECONDS)
        reader.join(RUN_TIMEOUT_SECONDS)
    finally:
        os.close(controller)
    written = b"".join(chunks).decode("utf-8", errors="replace")

    assert process.returncode == 0
    assert "step 2/2 Second" in written
    assert "tasks 1/1" in written
    assert "elapsed 0:00:0" in written
    assert "Job 'RunnerTest': success" in written
    # The progress line goes to the terminal only, and stdout contains the log lines.
    assert b"elapsed" not in stdout


def _read_all(descriptor: int, chunks: list[bytes]) -> None:
    while True:
        try:
            chunk = os.read(descriptor, 65536)
        except OSError:
            # Linux reports EIO once every copy of the terminal side is closed.
            return
        if not chunk:
            return
        chunks.append(chunk)
