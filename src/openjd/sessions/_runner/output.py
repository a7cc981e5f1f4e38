"""Output of the runner: text or JSON lines on stdout, a progress line and a summary on stderr.

Writers are event sinks, so backends call ``emit`` from their own threads. One lock keeps
lines whole and keeps the progress line below the latest output.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from abc import ABC, abstractmethod
from datetime import datetime, timezone
from typing import Any, Callable, Optional, TextIO

from .events import (
    ActionEvent,
    ActionKind,
    Event,
    JobResult,
    LogEvent,
    SessionEvent,
    StepEvent,
    StepResult,
)

__all__ = (
    "JsonLinesWriter",
    "OutputWriter",
    "ProgressLine",
    "TextWriter",
    "event_to_dict",
    "format_summary",
    "make_writer",
    "result_to_dict",
)

_UNSUCCESSFUL_STATES = ("failed", "canceled", "timeout")


class ProgressLine:
    """One status line on a terminal: steps, tasks done of total, running work, elapsed time.

    Task counts add up the final task events of every worker. It only tracks state and
    renders text. ``OutputWriter`` decides when to draw it.
    """

    def __init__(self, step_count: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._started = clock()
        self._step_count = step_count
        self._steps_started = 0
        # Running steps by name: [position in start order, tasks done, task count].
        self._active: dict[str, list[int]] = {}
        self._last: Optional[tuple[str, list[int]]] = None
        # Running tasks, by task id or session, with their latest progress.
        self._tasks: dict[str, Optional[float]] = {}
        # Running environment actions by session, as "entering NAME" or "exiting NAME".
        self._environment_actions: dict[str, str] = {}

    def update(self, event: Event) -> None:
        if isinstance(event, StepEvent):
            self._update_step(event)
        elif isinstance(event, ActionEvent):
            self._update_action(event)

    def render(self) -> str:
        parts = []
        steps = list(self._active.items()) or ([self._last] if self._last is not None else [])
        for name, (position, done, count) in steps:
            parts.append(f"step {position}/{self._step_count} {name}")
            parts.append(f"tasks {done}/{count}")
        if len(self._environment_actions) == 1:
            parts.extend(self._environment_actions.values())
        elif self._environment_actions:
            parts.append(f"{len(self._environment_actions)} environment actions")
        elif len(self._tasks) > 1:
            parts.append(f"{len(self._tasks)} tasks running")
        else:
            progress = next(iter(self._tasks.values()), None)
            if progress is not None:
                parts.append(f"task {progress:.0f}%")
        parts.append(f"elapsed {format_duration(self._clock() - self._started)}")
        return " | ".join(parts)

    def _update_step(self, event: StepEvent) -> None:
        if event.state == "started":
            self._steps_started += 1
            self._active[event.step] = [self._steps_started, 0, event.task_count]
        elif event.step in self._active:
            self._last = (event.step, self._active.pop(event.step))

    def _update_action(self, event: ActionEvent) -> None:
        running = event.state == "running"
        if event.kind == ActionKind.TASK:
            self._environment_actions.pop(event.session_id, None)
            key = event.task_id or event.session_id
            if running:
                self._tasks[key] = event.progress
                return
            self._tasks.pop(key, None)
            counts = self._active.get(event.step or "")
            if counts is not None:
                counts[1] += 1
        elif running:
            verb = "entering" if event.kind == ActionKind.ENTER else "exiting"
            self._environment_actions[event.session_id] = f"{verb} {event.environment}"
        else:
            self._environment_actions.pop(event.session_id, None)


class OutputWriter(ABC):
    """Base writer: serializes output and redraws the progress line around it."""

    def __init__(self, stdout: TextIO, stderr: TextIO, progress: Optional[ProgressLine]) -> None:
        self._stdout = stdout
        self._stderr = stderr
        self._progress = progress
        self._lock = threading.Lock()
        self._drawn = ""

    def emit(self, event: Event) -> None:
        with self._lock:
            if self._progress is not None:
                self._progress.update(event)
            lines = self.format_event(event)
            if lines:
                self._clear_progress()
                for line in lines:
                    self._stdout.write(line + "\n")
                self._stdout.flush()
            self._draw_progress()

    def tick(self) -> None:
        """Redraw the progress line so that its elapsed time stays current."""
        with self._lock:
            self._draw_progress()

    def notice(self, message: str) -> None:
        """Write a message of the runner itself to stderr."""
        with self._lock:
            self._clear_progress()
            self._stderr.write(message + "\n")
            self._stderr.flush()
            self._draw_progress()

    def finish(self, result: JobResult, *, show_summary: bool, preserved: bool) -> None:
        """Remove the progress line, then write the result and where the files were kept."""
        with self._lock:
            self._clear_progress()
            self._progress = None
            lines = self.format_result(result)
            if lines:
                self._stdout.write("".join(line + "\n" for line in lines))
                self._stdout.flush()
            if show_summary:
                self._stderr.write(format_summary(result))
            if preserved:
                for directory in result.working_directories:
                    self._stderr.write(f"Kept the session working directory: {directory}\n")
            self._stderr.flush()

    @abstractmethod
    def format_event(self, event: Event) -> list[str]:
        """Return the stdout lines for an event."""

    @abstractmethod
    def format_result(self, result: JobResult) -> list[str]:
        """Return the stdout lines for the result of the job."""

    def _draw_progress(self) -> None:
        if self._progress is None:
            return
        text = self._progress.render()[: max(self._terminal_width() - 1, 0)]
        if text != self._drawn:
            self._stderr.write("\r" + text + "\x1b[K")
            self._stderr.flush()
            self._drawn = text

    def _terminal_width(self) -> int:
        # The progress line is on stderr, while shutil measures stdout, which may be a pipe.
        try:
            columns = os.get_terminal_size(self._stderr.fileno()).columns
        except (OSError, ValueError, AttributeError):
            columns = 0
        return columns if columns > 0 else shutil.get_terminal_size().columns

    def _clear_progress(self) -> None:
        if self._drawn:
            self._stderr.write("\r\x1b[K")
            self._stderr.flush()
            self._drawn = ""


class TextWriter(OutputWriter):
    """Human-readable output: every log line, plus a line per step and per unsuccessful action.

    With ``show_worker``, each log line and action line starts with the worker and the
    running action in brackets, for example ``[local-2 Render Frame=3]``.
    """

    def __init__(
        self, stdout: TextIO, stderr: TextIO, progress: Optional[ProgressLine], *, show_worker: bool = False
    ) -> None:
        super().__init__(stdout, stderr, progress)
        self._show_worker = show_worker

    def format_event(self, event: Event) -> list[str]:
        if isinstance(event, LogEvent):
            return [self._prefix_log(event) + _escape_controls(event.message)]
        if isinstance(event, StepEvent):
            if event.result is None:
                return [f"Step {event.step!r} started: {_plural(event.task_count, 'task')}."]
            return [f"Step {event.step!r} finished: {_step_counts(event.result)}."]
        if isinstance(event, ActionEvent) and event.state in _UNSUCCESSFUL_STATES:
            prefix = f"[{event.worker}] " if self._show_worker and event.worker else ""
            return [prefix + _describe_unsuccessful(event)]
        return []

    def _prefix_log(self, event: LogEvent) -> str:
        if not self._show_worker or event.worker is None:
            return ""
        if event.action == ActionKind.TASK:
            label = f"{event.worker} {event.step}"
            if event.task:
                label += " " + _task_text(event.task)
        elif event.action in (ActionKind.ENTER, ActionKind.EXIT):
            label = f"{event.worker} {event.action} {event.environment}"
        else:
            label = event.worker
        return f"[{label}] "

    def format_result(self, result: JobResult) -> list[str]:
        return []


class JsonLinesWriter(OutputWriter):
    """Machine-readable output: one JSON object per line for every event and the result."""

    def format_event(self, event: Event) -> list[str]:
        return [json.dumps(event_to_dict(event))]

    def format_result(self, result: JobResult) -> list[str]:
        return [json.dumps(result_to_dict(result))]


def event_to_dict(event: Event) -> dict[str, Any]:
    """Convert an event to the JSON object that ``--output json`` writes."""
    if isinstance(event, LogEvent):
        return {
            "type": "log",
            "session_id": event.session_id,
            "worker": event.worker,
            "action": event.action,
            "step": event.step,
            "environment": event.environment,
            "task": event.task,
            "task_id": event.task_id,
            "level": event.level,
            "message": event.message,
            "time": format_time(event.time),
        }
    if isinstance(event, ActionEvent):
        return {
            "type": "action",
            "session_id": event.session_id,
            "worker": event.worker,
            "action": event.kind,
            "step": event.step,
            "environment": event.environment,
            "task": event.task,
            "task_id": event.task_id,
            "state": event.state,
            "progress": event.progress,
            "status_message": event.status_message,
            "fail_message": event.fail_message,
            "exit_code": event.exit_code,
            "time": format_time(event.time),
        }
    if isinstance(event, StepEvent):
        data: dict[str, Any] = {
            "type": "step",
            "step": event.step,
            "state": event.state,
            "task_count": event.task_count,
            "time": format_time(event.time),
        }
        if event.result is not None:
            data.update(_step_result_fields(event.result))
        return data
    return _session_event_to_dict(event)


def result_to_dict(result: JobResult) -> dict[str, Any]:
    """Convert the job result to the last JSON object that ``--output json`` writes."""
    return {
        "type": "result",
        "job": result.job_name,
        "result": _overall(result),
        "duration": round(result.duration, 3),
        "steps": [{"step": step.name, **_step_result_fields(step)} for step in result.steps],
        "environments_failed": list(result.environments_failed),
        "working_directories": [str(path) for path in result.working_directories],
        "workers": list(result.workers),
        "task_reruns": result.task_reruns,
    }


def format_summary(result: JobResult) -> str:
    """Render the end-of-run summary: one line per step and the overall result."""
    headline = f"Job {result.job_name!r}: {_overall(result)} after {_seconds(result.duration)}"
    if len(result.workers) > 1:
        headline += f" on {len(result.workers)} workers"
    lines = ["", headline]
    for step in result.steps:
        line = f"  Step {step.name!r}: {_step_counts(step)}"
        if step.task_times.count:
            times = step.task_times
            line += (
                f"; step {_seconds(step.duration)}, task min {_seconds(times.minimum)}"
                f" / mean {_seconds(times.mean)} / max {_seconds(times.maximum)}"
            )
        lines.append(line)
        lines.extend(f"    Environment action did not succeed: {item}" for item in step.environments_failed)
    lines.extend(f"  Environment action did not succeed: {item}" for item in result.environments_failed)
    if result.task_reruns:
        lines.append(
            f"  {_plural(result.task_reruns, 'task')} started again on another worker after a worker was lost."
        )
    return "\n".join(lines) + "\n"


def format_time(seconds: float) -> str:
    """Format seconds since the epoch as ISO 8601 UTC with milliseconds."""
    moment = datetime.fromtimestamp(seconds, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def format_duration(seconds: float) -> str:
    """Format a duration as H:MM:SS."""
    whole = int(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def _session_event_to_dict(event: SessionEvent) -> dict[str, Any]:
    return {
        "type": "session",
        "session_id": event.session_id,
        "worker": event.worker,
        "host": event.host,
        "pid": event.pid,
        "state": event.state,
        "working_directory": str(event.working_directory),
        "time": format_time(event.time),
    }


def _step_result_fields(step: StepResult) -> dict[str, Any]:
    return {
        "succeeded": step.succeeded,
        "failed": step.failed,
        "canceled": step.canceled,
        "not_run": step.not_run,
        "environments_failed": list(step.environments_failed),
        "duration": round(step.duration, 3),
        "task_duration_min": round(step.task_times.minimum, 3),
        "task_duration_mean": round(step.task_times.mean, 3),
        "task_duration_max": round(step.task_times.maximum, 3),
    }


def _overall(result: JobResult) -> str:
    if result.succeeded:
        return "success"
    return "canceled" if result.canceled else "failed"


def _step_counts(step: StepResult) -> str:
    return (
        f"{step.succeeded}/{step.task_count} tasks succeeded, {step.failed} failed, "
        f"{step.canceled} canceled, {step.not_run} not run"
    )


def _describe_unsuccessful(event: ActionEvent) -> str:
    if event.kind == ActionKind.TASK:
        subject = f"Task {_task_text(event.task)} of step {event.step!r}"
    else:
        verb = "Entering" if event.kind == ActionKind.ENTER else "Exiting"
        subject = f"{verb} environment {event.environment!r}"
    details = [f"exit code {event.exit_code}"] if event.exit_code is not None else []
    if event.fail_message:
        details.append(event.fail_message)
    suffix = f" ({'; '.join(details)})" if details else ""
    return f"{subject} ended {event.state}{suffix}."


def _task_text(task: Optional[dict[str, str]]) -> str:
    if not task:
        return "(no parameters)"
    return " ".join(f"{name}={value}" for name, value in task.items())


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _seconds(value: float) -> str:
    if value < 10:
        return f"{value:.2f}s"
    return f"{value:.1f}s" if value < 60 else format_duration(value)


def make_writer(
    mode: str,
    stdout: TextIO,
    stderr: TextIO,
    *,
    step_count: int,
    show_progress: bool,
    show_worker: bool = False,
) -> OutputWriter:
    """Create the writer for ``--output MODE``.

    ``show_progress`` adds the progress line, and ``show_worker`` prefixes text lines with
    the worker and the running action.
    """
    progress = ProgressLine(step_count) if show_progress else None
    if mode == "json":
        return JsonLinesWriter(stdout, stderr, progress)
    return TextWriter(stdout, stderr, progress, show_worker=show_worker)


# C0 control characters other than tab and newline, and DEL: job output must not move the cursor,
# ring the bell or change the terminal's state through the runner's text output.
_CONTROL_ESCAPES = {code: f"\\x{code:02x}" for code in [*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F]}


def _escape_controls(text: str) -> str:
    """Show control characters of job output as ``\\xNN`` instead of sending them to the terminal."""
    return text.translate(_CONTROL_ESCAPES)
