"""The Sessions of one job on one cluster worker: one per distinct set of environments.

A cluster worker may run tasks of several steps in any order, so it does not switch a
Session between steps. Tasks of steps without step environments share a Session that
entered only the job environments. Each step with step environments gets its own
Session, which enters the job environments and then that step's environments. A Session
opens on the worker's first task that needs it, and stays open until ``close``, which
exits its environments in reverse order. A worker that runs several tasks at once opens
a second Session of the same set when the first one is busy.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .backend import CloseReport, TaskOutcome, TaskSpec
from .driver import EnteredEnvironment, LogForwarder, SessionDriver
from .events import EventSink
from .plan import JobPlan, StepPlan

__all__ = ("WorkerSessions",)

# How long ``close`` waits for a task that is still running after it canceled the task.
_CLOSE_WAIT_SECONDS = 60.0


@dataclass
class _EnvironmentSession:
    """One Session with the job environments and, for ``step``, that step's environments."""

    step: Optional[StepPlan]
    driver: SessionDriver
    job_entered: list[EnteredEnvironment] = field(default_factory=list)
    step_entered: list[EnteredEnvironment] = field(default_factory=list)
    ready: bool = False
    """True when every environment was entered, so tasks may run."""
    busy_task: Optional[str] = None
    """Id of the task that is using the Session, or ``None`` while it is free."""


class WorkerSessions:
    """Run tasks of one job on this worker, and end the job's Sessions on ``close``.

    ``run_task`` may be called from several threads at once. ``stop`` and ``close`` may be
    called from any thread.
    """

    def __init__(
        self,
        plan: JobPlan,
        events: EventSink,
        worker: str,
        *,
        forwarder: Optional[LogForwarder] = None,
        retain_working_dir: bool = False,
        session_root_directory: Optional[Path] = None,
    ) -> None:
        self._plan = plan
        self._events = events
        self._worker = worker
        self._forwarder = forwarder
        self._retain_working_dir = retain_working_dir
        self._session_root_directory = session_root_directory
        self._condition = threading.Condition()
        self._sessions: list[_EnvironmentSession] = []
        self._stopped = False
        self._cancel: Optional[bool] = None
        self._closed = False

    def run_task(self, task: TaskSpec) -> TaskOutcome:
        """Run one task in a Session of its environment set, opening the Session if needed."""
        step = self._plan.steps[task.step_index]
        with self._condition:
            if self._stopped or self._closed:
                return TaskOutcome(task_id=task.task_id, state=None, worker=self._worker)
            session = self._free_session(step)
            is_new = session is None
            if session is None:
                session = _EnvironmentSession(step=step if step.environments else None, driver=self._new_driver())
                self._sessions.append(session)
            session.busy_task = task.task_id
        try:
            if is_new:
                outcome = self._open(session, task)
                if outcome is not None:
                    return outcome
            if not session.ready or session.driver.stopped:
                # After an action that did not succeed, a Session only accepts environment
                # exits, and the job is stopping anyway.
                return TaskOutcome(task_id=task.task_id, state=None, worker=self._worker)
            started = time.monotonic()
            status = session.driver.run_task(step, task.parameters, task_id=task.task_id)
            duration = time.monotonic() - started
            state = status.state.value if status is not None else None
            return TaskOutcome(task_id=task.task_id, state=state, duration=duration, worker=self._worker)
        finally:
            with self._condition:
                session.busy_task = None
                self._condition.notify_all()

    def stop(self, *, cancel_running: bool, immediate: bool = False) -> list[str]:
        """Start no more tasks, cancel the running ones if asked, and return their ids.

        With ``immediate``, a running environment exit is terminated too.
        """
        with self._condition:
            self._stopped = True
            if cancel_running:
                self._cancel = immediate or bool(self._cancel)
            sessions = list(self._sessions)
            running = [session.busy_task for session in sessions if session.busy_task is not None]
        if cancel_running:
            for session in sessions:
                session.driver.cancel(immediate=immediate)
        return running

    def close(self) -> CloseReport:
        """Exit the environments of every Session in reverse order and end the Sessions.

        A task that still runs is terminated first. Calling it again returns an empty report.
        """
        with self._condition:
            if self._closed:
                return CloseReport()
            self._closed = True
            self._stopped = True
            sessions = list(self._sessions)
        for session in sessions:
            if session.busy_task is not None:
                session.driver.cancel(immediate=True)
        with self._condition:
            self._condition.wait_for(
                lambda: all(session.busy_task is None for session in sessions), timeout=_CLOSE_WAIT_SECONDS
            )

        report = CloseReport()
        for session in sessions:
            if not session.driver.has_session:
                continue
            if session.step is not None:
                failures = session.driver.exit_environments(
                    session.step_entered, step=session.step.name, keep_session_running=True
                )
                report.step_environment_failures.setdefault(session.step.name, []).extend(self._describe(failures))
            failures = session.driver.exit_environments(session.job_entered, step=None, keep_session_running=False)
            report.job_environment_failures.extend(self._describe(failures))
            session.driver.close_session()
        return report

    def _free_session(self, step: StepPlan) -> Optional[_EnvironmentSession]:
        wanted = step.name if step.environments else None
        for session in self._sessions:
            name = session.step.name if session.step is not None else None
            if name == wanted and session.busy_task is None:
                return session
        return None

    def _new_driver(self) -> SessionDriver:
        driver = SessionDriver(self._events, worker=self._worker)
        if self._cancel is not None:
            driver.cancel(immediate=self._cancel)
        return driver

    def _open(self, session: _EnvironmentSession, task: TaskSpec) -> Optional[TaskOutcome]:
        """Open the Session and enter its environments; return an outcome when that failed."""
        driver = session.driver
        driver.open_session(
            self._plan,
            retain_working_dir=self._retain_working_dir,
            session_root_directory=self._session_root_directory,
            forwarder=self._forwarder,
        )
        entering = driver.enter_environments(self._plan.environments, step=None)
        session.job_entered = entering.entered
        if not entering.complete:
            return TaskOutcome(
                task_id=task.task_id,
                state=None,
                worker=self._worker,
                job_environment_failures=tuple(self._describe(entering.failures)),
            )
        if session.step is not None:
            entering = driver.enter_environments(session.step.environments, step=session.step.name)
            session.step_entered = entering.entered
            if not entering.complete:
                return TaskOutcome(
                    task_id=task.task_id,
                    state=None,
                    worker=self._worker,
                    step_environment_failures=tuple(self._describe(entering.failures)),
                )
        session.ready = True
        return None

    def _describe(self, failures: list[str]) -> list[str]:
        return [f"{failure} on {self._worker}" for failure in failures]
