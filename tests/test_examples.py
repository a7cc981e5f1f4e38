"""Run the job templates in ``examples/`` with the ``openjd-sessions run`` command and the API.

The runner is started as ``python -m openjd.sessions._runner.cli`` with the test
interpreter, so the tests use the package that pytest imports. Most tests read the
``--output json`` event stream: one JSON object per line, with ``type`` set to ``log``,
``action``, ``step``, ``session`` or ``result``.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from openjd.model import Job, StepParameterSpaceIterator

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "examples"
RENDER_TEMPLATE = EXAMPLES / "render" / "job.yaml"
CANCEL_TEMPLATE = EXAMPLES / "cancel" / "job.yaml"

# Generous limit that only guards against hangs.
RUN_TIMEOUT_SECONDS = 180

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="the examples use POSIX signals")


class RunResult:
    """Exit status and output of one ``openjd-sessions run``."""

    def __init__(self, completed: subprocess.CompletedProcess[str]) -> None:
        self.returncode = completed.returncode
        self.stdout = completed.stdout
        self.stderr = completed.stderr

    def events(self, event_type: Optional[str] = None) -> list[dict[str, Any]]:
        """Parse the JSON lines of stdout, keeping only ``event_type`` when given."""
        parsed = [json.loads(line) for line in self.stdout.splitlines() if line.strip()]
        return [event for event in parsed if event_type is None or event["type"] == event_type]

    def log_text(self) -> str:
        return "\n".join(event["message"] for event in self.events("log"))

    def final_actions(self, action: str, step: Optional[str] = None) -> list[dict[str, Any]]:
        """Return the final-state events of one kind of action, optionally of one step."""
        return [
            event
            for event in self.events("action")
            if event["action"] == action
            and event["state"] != "running"
            and (step is None or event["step"] == step)
        ]

    def describe(self) -> str:
        return f"exit status {self.returncode}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


def runner_command(template: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "openjd.sessions._runner.cli", "run", str(template), *args]


def run_runner(template: Path, *args: str, cwd: Path) -> RunResult:
    completed = subprocess.run(
        runner_command(template, *args),
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=RUN_TIMEOUT_SECONDS,
    )
    return RunResult(completed)


# Model-level checks of the templates.


def test_examples_decode_and_create_jobs(job_from_yaml: Callable[..., Job]) -> None:
    templates = sorted(EXAMPLES.glob("*/job.yaml"))

    assert [path.parent.name for path in templates] == ["cancel", "render"]
    for path in templates:
        job = job_from_yaml(path.read_text(), template_dir=path.parent)
        assert job.steps, path


def test_render_template_chunks_contiguous_frames(job_from_yaml: Callable[..., Job]) -> None:
    job = job_from_yaml(RENDER_TEMPLATE.read_text())
    render, encode = job.steps

    frames = [task["Frame"].value for task in StepParameterSpaceIterator(space=render.parameterSpace)]
    chunks = [task["Frames"].value for task in StepParameterSpaceIterator(space=encode.parameterSpace)]

    assert frames == [str(frame) for frame in range(1, 9)]
    assert chunks == ["1-3", "4-6", "7-8"]
    assert encode.dependencies is not None
    assert [dependency.dependsOn for dependency in encode.dependencies] == ["Render"]


def test_cancel_template_resolves_time_limits(job_from_yaml: Callable[..., Job]) -> None:
    job = job_from_yaml(CANCEL_TEMPLATE.read_text(), {"TimeoutSeconds": "7", "NotifyPeriodSeconds": "4"})
    actions = {step.name: step.script.actions.onRun for step in job.steps}

    assert actions["FinishesInTime"].timeout == 60
    assert actions["TimesOut"].timeout == 7
    assert actions["TimesOut"].cancelation is None
    assert actions["IgnoresNotice"].cancelation.notifyPeriodInSeconds == 4
    assert actions["StopsGracefully"].cancelation.mode.value == "NOTIFY_THEN_TERMINATE"


# The render example.


@pytest.mark.slow
def test_render_example_writes_frames_and_clips(tmp_path: Path, python_exe: str) -> None:
    result = run_runner(
        RENDER_TEMPLATE,
        "-p", f"Python={python_exe}",
        "-p", f"OutputDir={tmp_path}",
        "--output", "json",
        cwd=tmp_path,
    )  # fmt: skip

    assert result.returncode == 0, result.describe()
    frames = sorted(path.name for path in tmp_path.glob("frame_*.ppm"))
    assert frames == [f"frame_{frame:04d}.ppm" for frame in range(1, 9)]
    clips = sorted(path.name for path in tmp_path.glob("clip_*.ppm.gz"))
    assert clips == ["clip_0001-0003.ppm.gz", "clip_0004-0006.ppm.gz", "clip_0007-0008.ppm.gz"]
    first_clip = gzip.decompress((tmp_path / "clip_0001-0003.ppm.gz").read_bytes())
    assert first_clip == b"".join(
        (tmp_path / f"frame_{frame:04d}.ppm").read_bytes() for frame in (1, 2, 3)
    )
    assert result.events("result")[-1]["result"] == "success"


@pytest.mark.slow
def test_render_example_reports_task_states(tmp_path: Path, python_exe: str) -> None:
    result = run_runner(
        RENDER_TEMPLATE,
        "-p", f"Python={python_exe}",
        "-p", f"OutputDir={tmp_path}",
        "--output", "json",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.describe()

    renders = result.final_actions("task", step="Render")
    assert [event["task"] for event in renders] == [{"Frame": str(frame)} for frame in range(1, 9)]
    for frame, event in enumerate(renders, start=1):
        assert event["state"] == "success"
        assert event["exit_code"] == 0
        assert event["progress"] == 100.0
        assert event["status_message"] == f"Frame {frame} written to {tmp_path}/frame_{frame:04d}.ppm"

    encodes = result.final_actions("task", step="Encode")
    assert [event["task"] for event in encodes] == [{"Frames": "1-3"}, {"Frames": "4-6"}, {"Frames": "7-8"}]
    assert [event["state"] for event in encodes] == ["success"] * 3
    assert encodes[0]["status_message"] == "Clip clip_0001-0003.ppm.gz written"

    environment_actions = result.final_actions("enter") + result.final_actions("exit")
    assert [(event["action"], event["environment"], event["state"]) for event in environment_actions] == [
        ("enter", "RenderSettings", "success"),
        ("exit", "RenderSettings", "success"),
    ]


@pytest.mark.slow
def test_render_example_sets_environment(tmp_path: Path, python_exe: str) -> None:
    result = run_runner(
        RENDER_TEMPLATE,
        "-p", f"Python={python_exe}",
        "-p", f"OutputDir={tmp_path}",
        "-p", "FrameRange=3-5",
        "-p", "Width=16",
        "-p", "Height=9",
        cwd=tmp_path,
    )  # fmt: skip

    assert result.returncode == 0, result.describe()
    assert "Setting: RENDER_WIDTH=16" in result.stdout
    assert "Setting: RENDER_HEIGHT=9" in result.stdout
    assert f"openjd_env: RENDER_OUTPUT_DIR={tmp_path}" in result.stdout
    assert "Rendering frame 4 at 16x9" in result.stdout
    assert "3 frames and 1 clips in" in result.stdout
    assert (tmp_path / "frame_0005.ppm").read_bytes().startswith(b"P6\n16 9\n255\n")
    assert sorted(path.name for path in tmp_path.glob("clip_*")) == ["clip_0003-0005.ppm.gz"]


@pytest.mark.slow
def test_render_default_output_in_session(tmp_path: Path, python_exe: str) -> None:
    result = run_runner(
        RENDER_TEMPLATE,
        "-p", f"Python={python_exe}",
        "-p", "FrameRange=1-2",
        "--preserve",
        "--output", "json",
        cwd=tmp_path,
    )  # fmt: skip
    sessions = result.events("session")
    working_directory = Path(sessions[0]["working_directory"]) if sessions else None
    try:
        assert result.returncode == 0, result.describe()
        assert working_directory is not None
        output_dir = working_directory / "output"
        assert sorted(path.name for path in output_dir.iterdir()) == [
            "clip_0001-0002.ppm.gz",
            "frame_0001.ppm",
            "frame_0002.ppm",
        ]
        assert list(tmp_path.iterdir()) == []
    finally:
        if working_directory is not None:
            shutil.rmtree(working_directory, ignore_errors=True)


@pytest.mark.slow
def test_render_encode_alone_fails(tmp_path: Path, python_exe: str) -> None:
    result = run_runner(
        RENDER_TEMPLATE,
        "--step", "Encode",
        "-p", f"Python={python_exe}",
        "-p", f"OutputDir={tmp_path}",
        "--output", "json",
        cwd=tmp_path,
    )  # fmt: skip

    assert result.returncode == 1, result.describe()
    encodes = result.final_actions("task", step="Encode")
    assert len(encodes) == 1
    assert encodes[0]["state"] == "failed"
    assert encodes[0]["exit_code"] == 1
    assert encodes[0]["fail_message"].startswith("Frame not found:")
    assert [event["state"] for event in result.final_actions("exit")] == ["success"]
    assert list(tmp_path.glob("clip_*")) == []
    assert result.events("result")[-1]["result"] == "failed"


# The cancel example.

CANCEL_PARAMETERS = ("-p", "TimeoutSeconds=1", "-p", "NotifyPeriodSeconds=2")

# Step name -> (exit status of the runner, final task state, exit code of the task process).
CANCEL_OUTCOMES = {
    "FinishesInTime": (0, "success", 0),
    "TimesOut": (1, "timeout", -9),
    "StopsGracefully": (1, "timeout", 0),
    "IgnoresNotice": (1, "timeout", -9),
}


@posix_only
@pytest.mark.slow
@pytest.mark.parametrize("step", sorted(CANCEL_OUTCOMES))
def test_cancel_example_step_outcome(step: str, tmp_path: Path, python_exe: str) -> None:
    returncode, state, exit_code = CANCEL_OUTCOMES[step]

    result = run_runner(
        CANCEL_TEMPLATE,
        "--step", step,
        "-p", f"Python={python_exe}",
        *CANCEL_PARAMETERS,
        "--output", "json",
        cwd=tmp_path,
    )  # fmt: skip

    assert result.returncode == returncode, result.describe()
    tasks = result.final_actions("task", step=step)
    assert len(tasks) == 1, result.describe()
    assert tasks[0]["state"] == state
    assert tasks[0]["exit_code"] == exit_code


@posix_only
@pytest.mark.slow
def test_cancel_graceful_stop_reads_deadline(tmp_path: Path, python_exe: str) -> None:
    result = run_runner(
        CANCEL_TEMPLATE,
        "--step", "StopsGracefully",
        "-p", f"Python={python_exe}",
        *CANCEL_PARAMETERS,
        "--output", "json",
        cwd=tmp_path,
    )  # fmt: skip
    log = result.log_text()

    assert "TIMEOUT - Runtime limit reached at" in log, result.describe()
    assert "via notify then terminate method" in log
    notice = [line for line in log.splitlines() if line.startswith("Received SIGTERM.")]
    assert len(notice) == 1, log
    deadline = notice[0].rsplit(" ", 1)[-1]
    assert f"Grace period ends at {deadline}" in log
    task = result.final_actions("task")[0]
    assert task["status_message"].startswith("Checkpoint saved to ")


@posix_only
@pytest.mark.slow
def test_cancel_ignored_notice_killed(tmp_path: Path, python_exe: str) -> None:
    result = run_runner(
        CANCEL_TEMPLATE,
        "--step", "IgnoresNotice",
        "-p", f"Python={python_exe}",
        *CANCEL_PARAMETERS,
        "--output", "json",
        cwd=tmp_path,
    )  # fmt: skip
    log = result.log_text()

    assert "Received SIGTERM, ignoring it and working on" in log, result.describe()
    assert "Notify period ended. Terminate at" in log
    assert log.index("Received SIGTERM") < log.index("Notify period ended")


@posix_only
@pytest.mark.slow
def test_cancel_all_steps_stop_at_timeout(tmp_path: Path, python_exe: str) -> None:
    result = run_runner(
        CANCEL_TEMPLATE,
        "-p", f"Python={python_exe}",
        *CANCEL_PARAMETERS,
        "--output", "json",
        cwd=tmp_path,
    )  # fmt: skip

    assert result.returncode == 1, result.describe()
    ran = [(event["step"], event["state"]) for event in result.final_actions("task")]
    assert ran == [("FinishesInTime", "success"), ("TimesOut", "timeout")]


@posix_only
@pytest.mark.slow
def test_cancel_sigint_cancels_task(tmp_path: Path, python_exe: str) -> None:
    stdout_path = tmp_path / "stdout.jsonl"
    with stdout_path.open("w") as stdout_file:
        process = subprocess.Popen(
            runner_command(
                CANCEL_TEMPLATE,
                "--step", "IgnoresNotice",
                "-p", f"Python={python_exe}",
                "-p", "TimeoutSeconds=600",
                "-p", "NotifyPeriodSeconds=1",
                "--output", "json",
            ),
            stdout=stdout_file,
            stderr=subprocess.DEVNULL,
            cwd=tmp_path,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
            while "Working for 10 minutes" not in stdout_path.read_text():
                assert process.poll() is None, stdout_path.read_text()
                assert time.monotonic() < deadline, "the task did not start"
                time.sleep(0.1)

            process.send_signal(signal.SIGINT)
            returncode = process.wait(timeout=RUN_TIMEOUT_SECONDS)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    result = RunResult(subprocess.CompletedProcess([], returncode, stdout_path.read_text(), ""))

    assert returncode == 128 + signal.SIGINT, result.describe()
    tasks = result.final_actions("task")
    assert [(task["state"], task["exit_code"]) for task in tasks] == [("canceled", -9)]
    assert "Received SIGTERM, ignoring it and working on" in result.log_text()


# The API example.


@pytest.mark.slow
def test_api_example_runs_render(tmp_path: Path, python_exe: str) -> None:
    completed = subprocess.run(
        [
            python_exe,
            str(EXAMPLES / "api" / "run_job.py"),
            str(RENDER_TEMPLATE),
            f"Python={python_exe}",
            f"OutputDir={tmp_path}",
            "FrameRange=1-4",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=RUN_TIMEOUT_SECONDS,
    )

    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert len(list(tmp_path.glob("frame_*.ppm"))) == 4
    assert sorted(path.name for path in tmp_path.glob("clip_*")) == [
        "clip_0001-0002.ppm.gz",
        "clip_0003-0004.ppm.gz",
    ]
    assert "api-demo  4 frames and 2 clips in" in completed.stdout


@posix_only
@pytest.mark.slow
def test_api_example_stops_at_timeout(tmp_path: Path, python_exe: str) -> None:
    completed = subprocess.run(
        [
            python_exe,
            str(EXAMPLES / "api" / "run_job.py"),
            str(CANCEL_TEMPLATE),
            f"Python={python_exe}",
            "TimeoutSeconds=1",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=RUN_TIMEOUT_SECONDS,
    )

    assert completed.returncode == 1, completed.stdout + completed.stderr
    assert "TIMEOUT - Runtime limit reached at" in completed.stdout
    assert "Received SIGTERM" not in completed.stdout


def test_readme_example_runs(tmp_path: Path) -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    start = readme.index("```python\nimport sys\n") + len("```python\n")
    code = readme[start : readme.index("```", start)]
    script = tmp_path / "readme_example.py"
    script.write_text(code)

    completed = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=RUN_TIMEOUT_SECONDS,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )

    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert completed.stdout == "action ended: SUCCESS, exit code 0\n"
