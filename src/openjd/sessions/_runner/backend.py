"""Backends run a ``JobPlan`` and report events. ``LocalBackend`` uses one Session on this host.

A backend owns its Sessions. The runner calls ``run_job`` once, on a thread of its own,
and may call ``cancel`` from another thread at any time. Another backend (several
Sessions on threads, or a cluster) implements the same two methods and may reuse
``SessionDriver`` for each Session it owns.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional

from openjd.model import TaskParameterSet

from openjd.sessions import (
    LOG,
    ActionState,
    ActionStatus,
    EnvironmentIdentifier,
    EnvironmentModel,
    Session,
)

from .events import (
    ActionEvent,
    ActionKind,
    EventSink,
    JobResult,
    LogEvent,
    SessionEvent,
    StepEvent,
    StepResult,
)
from .plan import JobPlan, StepPlan

__all__ = ("Backend", "LocalBackend", "SessionDriver")


class Backend(ABC):
    """Engine that runs a job plan and reports what happens to an event sink."""

    @abstractmethod
    def run_job(self, plan: JobPlan, events: EventSink) -> JobResult:
        """Run every step of ``plan``, block until the job is over, and return the result.

        Environments are exited even after a failure or a cancel, so the result is only
        returned once every entered environment has been exited.
        """

    @abstractmethod
    def cancel(self, *, immediate: bool = False) -> None:
        """Stop the run from any thread, while ``run_job`` still exits the entered environments.

        The first request cancels running tasks and environment enters with their own
        cancelation method and starts no new ones. With ``immediate=True`` the running
        action, including an environment exit, is terminated at once.
        """


class LocalBackend(Backend):
    """Run the whole job in one Session on this host, one action at a time."""

    def __init__(
        self,
        *,
        retain_working_dir: bool = False,
        session_root_directory: Optional[Path] = None,
    ) -> None:
        self._retain_working_dir = retain_working_dir
        self._session_root_directory = session_root_directory
        self._lock = threading.Lock()
        self._driver: Optional[SessionDriver] = None
        self._cancel_requested = False

    def run_job(self, plan: JobPlan, events: EventSink) -> JobResult:
        result = JobResult(
            job_name=plan.job_name,
            steps=[StepResult(name=step.name, task_count=step.task_count) for step in plan.steps],
        )
        started = time.monotonic()
        forwarder = LogForwarder(events)
        LOG.addHandler(forwarder)
        try:
            self._run_in_session(plan, events, result)
        finally:
            LOG.removeHandler(forwarder)
        result.duration = time.monotonic() - started
        return result

    def cancel(self, *, immediate: bool = False) -> None:
        with self._lock:
            self._cancel_requested = True
            driver = self._driver
        if driver is not None:
            driver.cancel(immediate=immediate)

    def _run_in_session(self, plan: JobPlan, events: EventSink, result: JobResult) -> None:
        session_id = f"run-{uuid.uuid4().hex[:8]}-"
        driver = SessionDriver(events)
        session = Session(
            session_id=session_id,
            job_parameter_values=plan.job_parameter_values,
            path_mapping_rules=list(plan.path_mapping_rules) or None,
            retain_working_dir=self._retain_working_dir,
            callback=driver.handle_status,
            session_root_directory=self._session_root_directory,
            revision_extensions=plan.revision_extensions(),
        )
        driver.attach(session, session_id)
        with self._lock:
            self._driver = driver
            cancel_requested = self._cancel_requested
        if cancel_requested:
            driver.cancel()

        result.working_directories.append(session.working_directory)
        events.emit(_session_event(session_id, session, "started"))
        try:
            run_steps(driver, plan, result)
        finally:
            session.cleanup()
            events.emit(_session_event(session_id, session, "ended"))
        result.canceled = driver.canceled


def run_steps(driver: SessionDriver, plan: JobPlan, result: JobResult) -> None:
    """Enter the job environments, run the steps in order, then exit the environments."""
    entering = driver.enter_environments(plan.environments, step=None)
    result.environments_failed.extend(entering.failures)

    if entering.complete:
        for step, step_result in zip(plan.steps, result.steps):
            if driver.stopped:
                break
            run_step(driver, step, step_result)
            if not step_result.succeeded_all:
                break

    exits = driver.exit_environments(entering.entered, step=None, keep_session_running=False)
    result.environments_failed.extend(exits)


def run_step(driver: SessionDriver, step: StepPlan, result: StepResult) -> None:
    """Enter a step's environments, run its tasks until one fails, then exit them."""
    driver.events.emit(StepEvent(step=step.name, state="started", task_count=step.task_count, time=time.time()))
    started = time.monotonic()

    entering = driver.enter_environments(step.environments, step=step.name)
    result.environments_failed.extend(entering.failures)
    if entering.complete:
        for parameters in step.tasks():
            if driver.stopped:
                break
            task_started = time.monotonic()
            status = driver.run_task(step, parameters)
            if status is None:
                break
            result.task_times.add(time.monotonic() - task_started)
            if status.state == ActionState.SUCCESS:
                result.succeeded += 1
            elif status.state == ActionState.CANCELED:
                result.canceled += 1
            else:
                result.failed += 1
            if status.state != ActionState.SUCCESS:
                break

    exits = driver.exit_environments(entering.entered, step=step.name, keep_session_running=True)
    result.environments_failed.extend(exits)
    result.duration = time.monotonic() - started
    driver.events.emit(
        StepEvent(
            step=step.name,
            state="finished",
            task_count=step.task_count,
            time=time.time(),
            result=result,
        )
    )


@dataclass(frozen=True)
class _EnteredEnvironment:
    """Environment on the session's stack, which must be exited whatever its enter action did."""

    name: str
    identifier: EnvironmentIdentifier


@dataclass
class _EnterOutcome:
    """Result of entering a list of environments."""

    entered: list[_EnteredEnvironment] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    """Descriptions of enter actions that did not succeed."""
    complete: bool = False
    """True when every environment was entered successfully."""


class SessionDriver:
    """Run actions on one Session one at a time, waiting for each to end, and cancel them.

    The Session callback only records the status and wakes the waiting thread, because a
    Session does not accept a new action from inside its callback. ``cancel`` may be
    called from any thread, and the lock makes it see either no action or a started one.
    """

    def __init__(self, events: EventSink) -> None:
        self.events = events
        self._session: Optional[Session] = None
        self._session_id = ""
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._final: Optional[ActionStatus] = None
        # The running action, described for the events. It is None while no action runs.
        self._current: Optional[_ActionContext] = None
        self._canceled = False
        self._failed = False

    @property
    def canceled(self) -> bool:
        return self._canceled

    @property
    def stopped(self) -> bool:
        """True after a cancel request or a failed action: only environment exits follow."""
        return self._canceled or self._failed

    def attach(self, session: Session, session_id: str) -> None:
        self._session = session
        self._session_id = session_id

    def handle_status(self, session_id: str, status: ActionStatus) -> None:
        """Session callback: report the change, and wake the waiter when the action ended."""
        context = self._current
        if context is None:
            return
        self.events.emit(context.event(session_id, status))
        if status.state != ActionState.RUNNING:
            self._final = status
            self._done.set()

    def cancel(self, *, immediate: bool = False) -> None:
        """Cancel the running action, or the one being started, without waiting for it.

        A task or an environment enter is canceled with its own cancelation method, or
        terminated at once with ``immediate``. An environment exit is only terminated
        with ``immediate``. Actions started later are skipped, except environment exits.
        """
        with self._lock:
            self._canceled = True
            context = self._current
            if context is None or (context.kind == ActionKind.EXIT and not immediate):
                return
            if not context.started:
                # The worker thread applies the request once the start call returns.
                context.cancel_request = _CancelRequest(immediate=immediate)
                return
            # Holding the lock keeps the worker thread from starting the next action, so
            # the request cannot reach an action it was not meant for.
            self._cancel_running(immediate=immediate)

    def enter_environments(self, environments: Sequence[EnvironmentModel], *, step: Optional[str]) -> _EnterOutcome:
        """Enter environments in order until one does not succeed or a cancel stops the run."""
        outcome = _EnterOutcome()
        for environment in environments:
            if self.stopped:
                return outcome
            identifier, status = self._enter_environment(environment, step)
            if identifier is not None:
                outcome.entered.append(_EnteredEnvironment(environment.name, identifier))
            if status is None:
                return outcome
            if status.state != ActionState.SUCCESS:
                outcome.failures.append(f"enter {environment.name}: {status.state.value}")
                return outcome
        outcome.complete = True
        return outcome

    def _enter_environment(
        self, environment: EnvironmentModel, step: Optional[str]
    ) -> tuple[Optional[EnvironmentIdentifier], Optional[ActionStatus]]:
        """Enter one environment, and return its identifier if it is on the stack, and its status."""
        session = self._require_session()
        identifier = f"{self._session_id}:{uuid.uuid4().hex}"
        context = _ActionContext(ActionKind.ENTER, step=step, environment=environment.name)

        def start() -> None:
            session.enter_environment(environment=environment, identifier=identifier)

        status = self._run_action(context, start)
        # A Session keeps an environment on its stack even when its enter action failed,
        # but not when it rejected the call, so ask it instead of relying on the status.
        on_stack = identifier in session.environments_entered
        return (identifier if on_stack else None), status

    def exit_environments(
        self,
        entered: Sequence[_EnteredEnvironment],
        *,
        step: Optional[str],
        keep_session_running: bool,
    ) -> list[str]:
        """Exit environments in reverse order, even after failures, and describe the failures."""
        failures: list[str] = []
        for environment in reversed(entered):
            context = _ActionContext(ActionKind.EXIT, step=step, environment=environment.name)

            def start(identifier: EnvironmentIdentifier = environment.identifier) -> None:
                self._require_session().exit_environment(
                    identifier=identifier, keep_session_running=keep_session_running
                )

            status = self._run_action(context, start)
            if status is not None and status.state != ActionState.SUCCESS:
                failures.append(f"exit {environment.name}: {status.state.value}")
        return failures

    def run_task(self, step: StepPlan, parameters: TaskParameterSet) -> Optional[ActionStatus]:
        """Run one task and return its final status, or ``None`` when a cancel stopped it first."""
        task = {name: value.value for name, value in parameters.items()}
        context = _ActionContext(ActionKind.TASK, step=step.name, task=task)

        def start() -> None:
            self._require_session().run_task(step_script=step.script, task_parameter_values=parameters)

        return self._run_action(context, start)

    def _run_action(self, context: _ActionContext, start: Callable[[], None]) -> Optional[ActionStatus]:
        """Start an action and return its final status, or ``None`` if it was not started."""
        with self._lock:
            if self._canceled and context.kind != ActionKind.EXIT:
                return None
            self._done.clear()
            self._final = None
            self._current = context

        try:
            start()
        except Exception as exc:
            # The Session rejected the call or failed inside it, so no final callback will
            # come. Report a failed action so that the environments are still exited.
            self._fail_unstarted(context, exc)

        with self._lock:
            context.started = True
            if context.cancel_request is not None:
                self._cancel_running(immediate=context.cancel_request.immediate)

        self._done.wait()
        with self._lock:
            self._current = None
        status = self._final
        if status is not None and status.state != ActionState.SUCCESS:
            self._failed = True
        return status

    def _cancel_running(self, *, immediate: bool) -> None:
        try:
            self._require_session().cancel_action(time_limit=timedelta(0) if immediate else None)
        except RuntimeError:
            # The action ended before the request reached the Session, so nothing is left to cancel.
            pass

    def _fail_unstarted(self, context: _ActionContext, exc: Exception) -> None:
        message = f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, (RuntimeError, ValueError)):
            trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            self.events.emit(LogEvent(session_id=self._session_id, level="ERROR", message=trace, time=time.time()))
        self._final = ActionStatus(state=ActionState.FAILED, fail_message=message)
        self.events.emit(context.event(self._session_id, self._final))
        self._done.set()

    def _require_session(self) -> Session:
        if self._session is None:
            raise RuntimeError("SessionDriver.attach() must be called before starting actions.")
        return self._session


@dataclass(frozen=True)
class _CancelRequest:
    immediate: bool


class _ActionContext:
    """Purpose of an action: its kind, step, environment name and task parameters."""

    def __init__(
        self,
        kind: str,
        *,
        step: Optional[str] = None,
        environment: Optional[str] = None,
        task: Optional[dict[str, str]] = None,
    ) -> None:
        self.kind = kind
        self.step = step
        self.environment = environment
        self.task = task
        # True once the Session's start method has returned. The driver's lock guards it.
        self.started = False
        self.cancel_request: Optional[_CancelRequest] = None

    def event(self, session_id: str, status: ActionStatus) -> ActionEvent:
        return ActionEvent(
            session_id=session_id,
            kind=self.kind,
            state=ActionState(status.state).value,
            time=time.time(),
            step=self.step,
            environment=self.environment,
            task=self.task,
            progress=status.progress,
            status_message=status.status_message,
            fail_message=status.fail_message,
            exit_code=status.exit_code,
        )


class LogForwarder(logging.Handler):
    """Logging handler that turns ``openjd.sessions`` records into ``LogEvent``s."""

    def __init__(self, events: EventSink) -> None:
        super().__init__()
        self._events = events

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event = LogEvent(
                session_id=getattr(record, "session_id", None),
                level=record.levelname,
                message=record.getMessage(),
                time=record.created,
            )
            self._events.emit(event)
        except Exception:
            self.handleError(record)


def _session_event(session_id: str, session: Session, state: str) -> SessionEvent:
    return SessionEvent(
        session_id=session_id,
        state=state,
        working_directory=session.working_directory,
        time=time.time(),
    )
