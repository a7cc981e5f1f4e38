"""Events and results that a runner backend reports, independent of how it runs the job.

A backend reports what happens through an ``EventSink``: state changes of every action
and log lines of every session, each with the worker that owns the session. The job
runner adds the start and end of each step and returns a ``JobResult`` when the job is
over. Output writers consume both.

Events that cross a process boundary, from a cluster worker to the runner, travel as
plain dictionaries made by ``event_to_wire`` and read back by ``event_from_wire``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol, Union

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
    "WIRE_FLUSH_KEY",
    "event_from_wire",
    "event_to_wire",
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
    worker: Optional[str] = None
    """Worker that owns the session."""
    task_id: Optional[str] = None
    """Identifier of the task within the job; set for task actions only."""


@dataclass(frozen=True)
class LogEvent:
    """One record of the ``openjd.sessions`` logger, or a message of the runner itself."""

    session_id: Optional[str]
    """Session that logged the record, or ``None`` for records not tied to a session."""
    level: str
    message: str
    time: float
    worker: Optional[str] = None
    """Worker that owns the session, or that the runner's message is about."""
    action: Optional[str] = None
    """``ActionKind`` of the action that was running when the record was logged."""
    step: Optional[str] = None
    environment: Optional[str] = None
    task: Optional[dict[str, str]] = None
    task_id: Optional[str] = None


@dataclass(frozen=True)
class SessionEvent:
    """A session was created or ended."""

    session_id: str
    state: str
    """``started`` or ``ended``."""
    working_directory: Path
    time: float
    worker: Optional[str] = None
    host: Optional[str] = None
    """Host name of the worker."""
    pid: Optional[int] = None
    """Process id of the worker process that owns the session."""


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
    workers: list[str] = field(default_factory=list)
    """Workers that opened a session, in the order they did."""
    task_reruns: int = 0
    """Tasks that started again on another worker because their worker was lost."""

    @property
    def succeeded(self) -> bool:
        """True only when every action of every planned step succeeded."""
        return not self.canceled and not self.environments_failed and all(step.succeeded_all for step in self.steps)


WIRE_FLUSH_KEY = "flush_token"
"""Key of the wire message that a worker sends after its last event of a job."""

_WIRE_TYPES: dict[str, type[Union[ActionEvent, LogEvent, SessionEvent]]] = {
    "action": ActionEvent,
    "log": LogEvent,
    "session": SessionEvent,
}


def event_to_wire(event: Union[ActionEvent, LogEvent, SessionEvent]) -> dict[str, Any]:
    """Convert an action, log or session event to a dictionary of msgpack-compatible values."""
    data = dataclasses.asdict(event)
    if isinstance(event, SessionEvent):
        data["working_directory"] = str(event.working_directory)
    wire_type = next(name for name, cls in _WIRE_TYPES.items() if isinstance(event, cls))
    data["wire_type"] = wire_type
    return data


def event_from_wire(data: dict[str, Any]) -> Union[ActionEvent, LogEvent, SessionEvent]:
    """Rebuild an event from the dictionary that ``event_to_wire`` made.

    Raises:
        ValueError: ``data`` has no known ``wire_type``.
    """
    values = dict(data)
    wire_type = values.pop("wire_type", None)
    cls = _WIRE_TYPES.get(str(wire_type))
    if cls is None:
        raise ValueError(f"Event with unknown wire_type {wire_type!r}: expected one of {sorted(_WIRE_TYPES)}.")
    if cls is SessionEvent:
        values["working_directory"] = Path(values["working_directory"])
    return cls(**values)
