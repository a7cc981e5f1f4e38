"""The interface between the job runner and an engine that runs tasks in Sessions.

The job runner (``coordinator.JobRunner``) decides which steps may start, hands their
tasks to a ``Backend`` and counts the outcomes. The backend owns the Sessions: it picks
the worker for each task, enters and exits environments there, and reports every action
and log line as events. ``LocalBackend`` (``backend_local``) runs N Sessions on threads of
this process, and ``DaskBackend`` (``backend_dask``) runs them on the workers of a Dask
cluster. Another engine implements the seven methods of ``Backend`` and nothing else.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Optional

from openjd.model import TaskParameterSet

from .events import EventSink
from .plan import JobPlan

__all__ = ("Backend", "CloseReport", "TaskOutcome", "TaskSpec", "step_tasks")


@dataclass(frozen=True)
class TaskSpec:
    """One task of the job, small enough to send to another process."""

    task_id: str
    """``<step name>:<task index>``, unique within the job."""
    step_index: int
    """Index of the task's step in ``JobPlan.steps``."""
    task_index: int
    """Position of the task in its step's parameter space."""
    parameters: TaskParameterSet


@dataclass(frozen=True)
class TaskOutcome:
    """Result of one submitted task. Every submitted task gets exactly one."""

    task_id: str
    state: Optional[str]
    """Final ``ActionState`` value of the task's action, or ``None`` when it did not run."""
    duration: float = 0.0
    """Seconds from the start of the task's action to its end."""
    worker: Optional[str] = None
    job_environment_failures: tuple[str, ...] = ()
    """Job environment enter actions that did not succeed on the worker before this task."""
    step_environment_failures: tuple[str, ...] = ()
    """Step environment enter actions that did not succeed on the worker before this task."""
    message: Optional[str] = None
    """Reason the task failed outside its action, for example a lost worker."""

    @property
    def failed(self) -> bool:
        """True when the task did not succeed for a reason other than a stop request."""
        if self.job_environment_failures or self.step_environment_failures:
            return True
        if self.state is None:
            return self.message is not None
        return self.state != "success"


@dataclass
class CloseReport:
    """Environment exit actions that did not succeed while the backend closed its Sessions."""

    job_environment_failures: list[str] = field(default_factory=list)
    step_environment_failures: dict[str, list[str]] = field(default_factory=dict)
    """Failures of step environment exits, by step name."""


class Backend(ABC):
    """Engine that runs tasks in Sessions it owns and reports events about them.

    The job runner calls ``start`` once, then ``submit``, ``next_outcome`` and ``end_step``
    from one thread, and ``close`` once at the end, also after a failure or a cancel.
    ``stop`` and ``capacity`` may be called from any thread at any time.
    """

    @abstractmethod
    def start(self, plan: JobPlan, events: EventSink) -> list[str]:
        """Connect to the workers and report to ``events`` from now on.

        A backend may enter the job environments here. It returns the job environment enter
        actions that did not succeed, as descriptions, and the runner then starts no step.
        """

    @abstractmethod
    def capacity(self) -> int:
        """Return how many tasks the workers can run at the same time, at least 1."""

    @abstractmethod
    def submit(self, tasks: Sequence[TaskSpec]) -> None:
        """Queue tasks to run, in the given order as far as the engine keeps an order."""

    @abstractmethod
    def next_outcome(self, timeout: float) -> Optional[TaskOutcome]:
        """Wait up to ``timeout`` seconds for the next task outcome, or return ``None``."""

    @abstractmethod
    def end_step(self, step_index: int) -> list[str]:
        """Finish a step whose tasks all have their outcome, and return exit failures.

        A backend that exits a step's environments as soon as the step is over does that
        here and returns the exit actions that did not succeed. One that keeps them until
        ``close`` returns an empty list.
        """

    @abstractmethod
    def stop(self, *, cancel_running: bool, immediate: bool = False) -> None:
        """Run no more tasks: each task that has not started gets an outcome with state ``None``.

        With ``cancel_running``, running tasks and environment enters are canceled with their
        own cancelation method, or terminated at once with ``immediate``, which also ends a
        running environment exit. Without it, running tasks finish. It does not wait.
        """

    @abstractmethod
    def close(self) -> CloseReport:
        """Exit the environments of every Session in reverse order and end the Sessions."""


def step_tasks(plan: JobPlan, step_index: int) -> Iterator[TaskSpec]:
    """Iterate the tasks of one step of ``plan`` in parameter space order."""
    step = plan.steps[step_index]
    for task_index, parameters in enumerate(step.tasks()):
        yield TaskSpec(
            task_id=f"{step.name}:{task_index}",
            step_index=step_index,
            task_index=task_index,
            parameters=parameters,
        )
