"""Run a job plan on any ``Backend``: start steps when their dependencies are done, count outcomes.

``JobRunner`` is the part of the runner that does not depend on the engine. It starts a
step once every step it depends on has finished with all tasks succeeded, hands the
step's tasks to the backend, and reports the start and end of each step. Independent
steps run at the same time when the workers have room. The next ready step starts once
fewer tasks are outstanding than the backend can run at once. So with one worker, the
steps run one after another in dependency order.

The first task that does not succeed stops the run: no new step starts, tasks that have
not started are skipped, and running tasks finish or are canceled, as the runner was
configured. The backend's ``close`` always runs, so every entered environment is exited.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Optional

from .backend import Backend, TaskOutcome, step_tasks
from .events import (
    ActionEvent,
    ActionKind,
    Event,
    EventSink,
    JobResult,
    LogEvent,
    SessionEvent,
    StepEvent,
    StepResult,
)
from .plan import JobPlan

__all__ = ("JobRunner",)

# How long the runner waits for an outcome before it checks again whether a step can start.
_POLL_SECONDS = 0.1


@dataclass
class _StepState:
    started: Optional[float] = None
    """``time.monotonic()`` when the step started, or ``None`` while it waits."""
    outstanding: int = 0
    """Submitted tasks without an outcome yet."""
    finished: bool = False


class JobRunner:
    """Run a ``JobPlan`` on a backend and return the ``JobResult``.

    ``run_job`` blocks. ``cancel`` may be called from any other thread, for example a
    signal handler's thread.
    """

    def __init__(self, backend: Backend, *, cancel_running_on_failure: bool = False) -> None:
        self._backend = backend
        self._cancel_running_on_failure = cancel_running_on_failure
        self._lock = threading.Lock()
        self._stopping = False
        self._cancel_requested = False

    def run_job(self, plan: JobPlan, events: EventSink) -> JobResult:
        """Run every step of ``plan`` and return once every Session has ended."""
        result = JobResult(
            job_name=plan.job_name,
            steps=[StepResult(name=step.name, task_count=step.task_count) for step in plan.steps],
        )
        started = time.monotonic()
        tracker = _EventTracker(events, result)
        try:
            start_failures = self._backend.start(plan, tracker)
            result.environments_failed.extend(start_failures)
            if start_failures:
                self._stop(cancel_running=False)
            _StepScheduler(self, self._backend, plan, result, tracker).run()
        finally:
            report = self._backend.close()
            result.environments_failed.extend(report.job_environment_failures)
            for step_result in result.steps:
                step_result.environments_failed.extend(report.step_environment_failures.get(step_result.name, ()))
        result.canceled = self._cancel_requested
        result.duration = time.monotonic() - started
        return result

    def cancel(self, *, immediate: bool = False) -> None:
        """Stop the job: cancel running tasks, start nothing new, still exit the environments."""
        with self._lock:
            self._cancel_requested = True
            self._stopping = True
        self._backend.stop(cancel_running=True, immediate=immediate)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def stop_after_failure(self) -> None:
        self._stop(cancel_running=self._cancel_running_on_failure)

    def _stop(self, *, cancel_running: bool) -> None:
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        self._backend.stop(cancel_running=cancel_running)


class _StepScheduler:
    """The state of one ``run_job`` call: which steps wait, run or are done."""

    def __init__(
        self, runner: JobRunner, backend: Backend, plan: JobPlan, result: JobResult, events: EventSink
    ) -> None:
        self._runner = runner
        self._backend = backend
        self._plan = plan
        self._result = result
        self._events = events
        self._states = [_StepState() for _ in plan.steps]
        self._waiting = list(range(len(plan.steps)))
        self._succeeded: set[str] = set()
        self._step_of_task: dict[str, int] = {}

    def run(self) -> None:
        while True:
            if not self._runner.stopping:
                self._start_ready_steps()
            if not self._step_of_task:
                # Nothing is outstanding. A step can only still wait for a step that
                # failed, and a failure stops the run.
                if self._runner.stopping or not self._waiting or not self._start_ready_steps():
                    break
                continue
            outcome = self._backend.next_outcome(_POLL_SECONDS)
            if outcome is not None:
                self._record(outcome)

    def _start_ready_steps(self) -> int:
        """Start the waiting steps whose dependencies succeeded, while the workers have room."""
        started = 0
        for step_index in list(self._waiting):
            step = self._plan.steps[step_index]
            if not set(step.dependencies) <= self._succeeded:
                continue
            running = any(state.started is not None and not state.finished for state in self._states)
            if running and len(self._step_of_task) >= self._backend.capacity():
                break
            self._waiting.remove(step_index)
            self._start_step(step_index)
            started += 1
        return started

    def _start_step(self, step_index: int) -> None:
        step = self._plan.steps[step_index]
        state = self._states[step_index]
        state.started = time.monotonic()
        self._events.emit(StepEvent(step=step.name, state="started", task_count=step.task_count, time=time.time()))

        tasks = list(step_tasks(self._plan, step_index))
        for task in tasks:
            self._step_of_task[task.task_id] = step_index
        state.outstanding = len(tasks)
        if not tasks:
            self._finish_step(step_index)
            return
        self._backend.submit(tasks)

    def _record(self, outcome: TaskOutcome) -> None:
        step_index = self._step_of_task.pop(outcome.task_id, None)
        if step_index is None:
            # A second outcome for the same task. Backends should not send one; ignore it.
            return
        step_result = self._result.steps[step_index]
        self._result.environments_failed.extend(outcome.job_environment_failures)
        step_result.environments_failed.extend(outcome.step_environment_failures)

        if outcome.state is not None:
            step_result.task_times.add(outcome.duration)
        if outcome.state == "success":
            step_result.succeeded += 1
        elif outcome.state == "canceled":
            step_result.canceled += 1
        elif outcome.state is not None or outcome.message is not None:
            step_result.failed += 1
        if outcome.message is not None:
            self._events.emit(
                LogEvent(
                    session_id=None,
                    level="ERROR",
                    message=outcome.message,
                    time=time.time(),
                    worker=outcome.worker,
                    action=ActionKind.TASK,
                    step=step_result.name,
                    task_id=outcome.task_id,
                )
            )
        if outcome.failed:
            self._runner.stop_after_failure()

        state = self._states[step_index]
        state.outstanding -= 1
        if state.outstanding == 0:
            self._finish_step(step_index)

    def _finish_step(self, step_index: int) -> None:
        step = self._plan.steps[step_index]
        state = self._states[step_index]
        step_result = self._result.steps[step_index]
        step_result.environments_failed.extend(self._backend.end_step(step_index))
        state.finished = True
        step_result.duration = time.monotonic() - (state.started or time.monotonic())
        if step_result.succeeded_all:
            self._succeeded.add(step.name)
        finished = StepEvent(
            step=step.name, state="finished", task_count=step.task_count, time=time.time(), result=step_result
        )
        self._events.emit(finished)


class _EventTracker:
    """Event sink in front of the output: notes sessions, workers and tasks that run again.

    A task that reports ``running`` from a second worker before it ended started again
    because the first worker was lost, so the tracker counts it and logs a warning.
    """

    def __init__(self, events: EventSink, result: JobResult) -> None:
        self._events = events
        self._result = result
        self._lock = threading.Lock()
        self._running_on: dict[str, Optional[str]] = {}

    def emit(self, event: Event) -> None:
        notice: Optional[LogEvent] = None
        with self._lock:
            if isinstance(event, SessionEvent) and event.state == "started":
                self._result.working_directories.append(event.working_directory)
                if event.worker is not None and event.worker not in self._result.workers:
                    self._result.workers.append(event.worker)
            elif isinstance(event, ActionEvent) and event.kind == ActionKind.TASK and event.task_id:
                notice = self._track_task(event)
        if notice is not None:
            self._events.emit(notice)
        self._events.emit(event)

    def _track_task(self, event: ActionEvent) -> Optional[LogEvent]:
        task_id = event.task_id or ""
        if event.state != "running":
            self._running_on.pop(task_id, None)
            return None
        if task_id not in self._running_on:
            self._running_on[task_id] = event.worker
            return None
        previous = self._running_on[task_id]
        if previous == event.worker:
            return None

        self._running_on[task_id] = event.worker
        self._result.task_reruns += 1
        return LogEvent(
            session_id=event.session_id,
            level="WARNING",
            message=(
                f"Task {task_id} started again on worker {event.worker}, because worker {previous} "
                "was lost while running it. A task runs more than once only when its worker is lost."
            ),
            time=time.time(),
            worker=event.worker,
            action=ActionKind.TASK,
            step=event.step,
            task=event.task,
            task_id=task_id,
        )
