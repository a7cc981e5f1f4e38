"""Events and results that a runner backend reports, independent of how it runs the job.

A backend reports what happens through an ``EventSink``: state changes of every action,
log lines of every session, and the start and end of each step. It returns a
``JobResult`` when the job is over. Output writers consume both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol, Union

__all__ = (
    "ActionEvent",
    "ActionKind",
    "Event",
    "EventSink",
    "JobResult",
    "LogEvent",
    "SessionEvent",
    "StepEvent",
    "StepResult",
    "TaskTimes",
)


class ActionKind:
    """Values of ``ActionEvent.kind``."""

    ENTER = "enter"
    EXIT = "exit"
    TASK = "task"


@dataclass(frozen=True)
class ActionEvent:
    """A state change or a progress, status or fail message of one action."""

    session_id: str
    kind: str
    """One of the ``ActionKind`` values."""
    state: str
    """An ``ActionState`` value: running, success, failed, canceled or timeout."""
    time: float
    """Seconds since the epoch."""
    step: Optional[str] = None
    """Step of a task or of a step environment, or ``None`` for job environments."""
    environment: Optional[str] = None
    """Environment name of an enter or exit action."""
    task: Optional[dict[str, str]] = None
    """Task parameter values of a task action, by parameter name."""
    progress: Optional[float] = None
    status_message: Optional[str] = None
    fail_message: Optional[str] = None
    exit_code: Optional[int] = None


@dataclass(frozen=True)
class LogEvent:
    """One record of the ``openjd.sessions`` logger."""

    session_id: Optional[str]
    """Session that logged the record, or ``None`` for records not tied to a session."""
    level: str
    message: str
    time: float


@dataclass(frozen=True)
class SessionEvent:
    """A session was created or ended."""

    session_id: str
    state: str
    """``started`` or ``ended``."""
    working_directory: Path
    time: float


@dataclass(frozen=True)
class StepEvent:
    """A step started, with its task count, or finished, with its result."""

    step: str
    state: str
    """``started`` or ``finished``."""
    task_count: int
    time: float
    result: Optional[StepResult] = None
    """Set when ``state`` is ``finished``."""


Event = Union[ActionEvent, LogEvent, SessionEvent, StepEvent]


class EventSink(Protocol):
    """Receiver of a backend's events. Backends call it from any of their threads."""

    def emit(self, event: Event) -> None: ...


@dataclass
class TaskTimes:
    """Running statistics of task durations, in seconds."""

    count: int = 0
    total: float = 0.0
    minimum: float = 0.0
    maximum: float = 0.0

    def add(self, seconds: float) -> None:
        if self.count == 0:
            self.minimum = self.maximum = seconds
        else:
            self.minimum = min(self.minimum, seconds)
            self.maximum = max(self.maximum, seconds)
        self.count += 1
        self.total += seconds

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0


@dataclass
class StepResult:
    """Outcome of one step: task counts by final state, and durations in seconds."""

    name: str
    task_count: int
    succeeded: int = 0
    failed: int = 0
    """Tasks that ended ``failed`` or ``timeout``."""
    canceled: int = 0
    environments_failed: list[str] = field(default_factory=list)
    """Step environment enter or exit actions that did not succeed, as descriptions."""
    duration: float = 0.0
    """Wall time from entering the first step environment to exiting the last one."""
    task_times: TaskTimes = field(default_factory=TaskTimes)

    @property
    def not_run(self) -> int:
        return self.task_count - self.succeeded - self.failed - self.canceled

    @property
    def succeeded_all(self) -> bool:
        return self.succeeded == self.task_count and not self.environments_failed


@dataclass
class JobResult:
    """Outcome of a whole run."""

    job_name: str
    steps: list[StepResult] = field(default_factory=list)
    """Every planned step, in run order, including steps that never started."""
    environments_failed: list[str] = field(default_factory=list)
    """Descriptions of job environment enter or exit actions that did not succeed."""
    canceled: bool = False
    """True when a cancel request stopped the run."""
    duration: float = 0.0
    working_directories: list[Path] = field(default_factory=list)
    """Working directories of the sessions that ran the job."""

    @property
    def succeeded(self) -> bool:
        """True only when every action of every planned step succeeded."""
        return not self.canceled and not self.environments_failed and all(step.succeeded_all for step in self.steps)
