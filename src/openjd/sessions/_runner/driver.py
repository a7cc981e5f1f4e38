"""Run the actions of one Session one at a time and report them as events.

Every backend drives its Sessions through ``SessionDriver``, whichever thread or process
they live in. ``LogForwarder`` turns the records of the ``openjd.sessions`` logger into
``LogEvent``s that name the worker and the running action of the record's Session.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional

from openjd.model import TaskParameterSet

from openjd.sessions import (
    ActionState,
    ActionStatus,
    EnvironmentIdentifier,
    EnvironmentModel,
    Session,
)

from .events import ActionEvent, ActionKind, EventSink, LogEvent, SessionEvent
from .plan import JobPlan, StepPlan

__all__ = ("EnteredEnvironment", "EnterOutcome", "LogForwarder", "SessionDriver", "new_session_id")


def new_session_id() -> str:
    """Return a new session id. The Session adds random characters to it for its directory."""
    return f"run-{uuid.uuid4().hex[:8]}-"


@dataclass(frozen=True)
class EnteredEnvironment:
    """Environment on the session's stack, which must be exited whatever its enter action did."""

    name: str
    identifier: EnvironmentIdentifier


@dataclass
class EnterOutcome:
    """Result of entering a list of environments."""

    entered: list[EnteredEnvironment] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    """Descriptions of enter actions that did not succeed."""
    complete: bool = False
    """True when every environment was entered successfully."""


class SessionDriver:
    """Run actions on one Session one at a time, waiting for each to end, and cancel them.

    The Session callback only records the status and wakes the waiting thread, so the
    next action always starts from the thread that drives the Session. ``cancel`` may be
    called from any thread, and the lock makes it see either no action or a started one.
    """

    def __init__(self, events: EventSink, *, worker: Optional[str] = None) -> None:
        self.events = events
        self.worker = worker
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
    def session_id(self) -> str:
        return self._session_id

    @property
    def has_session(self) -> bool:
        return self._session is not None

    @property
    def canceled(self) -> bool:
        return self._canceled

    @property
    def stopped(self) -> bool:
        """True after a cancel request or a failed action: only environment exits follow."""
        return self._canceled or self._failed

    @property
    def current(self) -> Optional[_ActionContext]:
        """The running action, or ``None`` between actions."""
        return self._current

    def open_session(
        self,
        plan: JobPlan,
        *,
        retain_working_dir: bool = False,
        session_root_directory: Optional[Path] = None,
        forwarder: Optional[LogForwarder] = None,
    ) -> Session:
        """Create the Session for ``plan``, attach it and report it as started.

        ``forwarder`` learns the session id first, so it also forwards the records that
        the Session logs while it is created.
        """
        session_id = new_session_id()
        self._session_id = session_id
        if forwarder is not None:
            forwarder.register(self)
        session = Session(
            session_id=session_id,
            job_parameter_values=plan.job_parameter_values,
            path_mapping_rules=list(plan.path_mapping_rules) or None,
            retain_working_dir=retain_working_dir,
            callback=self.handle_status,
            session_root_directory=session_root_directory,
            revision_extensions=plan.revision_extensions(),
        )
        self.attach(session, session_id)
        self.events.emit(self._session_event("started"))
        return session

    def close_session(self) -> None:
        """End the Session, which kills leftover processes, and report it as ended."""
        session = self._require_session()
        session.cleanup()
        self.events.emit(self._session_event("ended"))

    def attach(self, session: Session, session_id: str) -> None:
        self._session = session
        self._session_id = session_id

    def handle_status(self, session_id: str, status: ActionStatus) -> None:
        """Session callback: report the change, and wake the waiter when the action ended."""
        context = self._current
        if context is None:
            return
        self.events.emit(context.event(session_id, status, self.worker))
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
                # The driving thread applies the request once the start call returns.
                context.cancel_request = _CancelRequest(immediate=immediate)
                return
            # Holding the lock keeps the driving thread from starting the next action, so
            # the request cannot reach an action it was not meant for.
            self._cancel_running(immediate=immediate)

    def enter_environments(self, environments: Sequence[EnvironmentModel], *, step: Optional[str]) -> EnterOutcome:
        """Enter environments in order until one does not succeed or a cancel stops the run."""
        outcome = EnterOutcome()
        for environment in environments:
            if self.stopped:
                return outcome
            identifier, status = self._enter_environment(environment, step)
            if identifier is not None:
                outcome.entered.append(EnteredEnvironment(environment.name, identifier))
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
        entered: Sequence[EnteredEnvironment],
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

    def run_task(
        self, step: StepPlan, parameters: TaskParameterSet, *, task_id: Optional[str] = None
    ) -> Optional[ActionStatus]:
        """Run one task and return its final status, or ``None`` when a cancel stopped it first."""
        task = {name: value.value for name, value in parameters.items()}
        context = _ActionContext(ActionKind.TASK, step=step.name, task=task, task_id=task_id)

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
            self.events.emit(
                LogEvent(
                    session_id=self._session_id, level="ERROR", message=trace, time=time.time(), worker=self.worker
                )
            )
        self._final = ActionStatus(state=ActionState.FAILED, fail_message=message)
        self.events.emit(context.event(self._session_id, self._final, self.worker))
        self._done.set()

    def _require_session(self) -> Session:
        if self._session is None:
            raise RuntimeError("SessionDriver.attach() must be called before starting actions.")
        return self._session

    def _session_event(self, state: str) -> SessionEvent:
        return SessionEvent(
            session_id=self._session_id,
            state=state,
            working_directory=self._require_session().working_directory,
            time=time.time(),
            worker=self.worker,
            host=socket.gethostname(),
            pid=os.getpid(),
        )


@dataclass(frozen=True)
class _CancelRequest:
    immediate: bool


class _ActionContext:
    """Purpose of an action: its kind, step, environment name and task."""

    def __init__(
        self,
        kind: str,
        *,
        step: Optional[str] = None,
        environment: Optional[str] = None,
        task: Optional[dict[str, str]] = None,
        task_id: Optional[str] = None,
    ) -> None:
        self.kind = kind
        self.step = step
        self.environment = environment
        self.task = task
        self.task_id = task_id
        # True once the Session's start method has returned. The driver's lock guards it.
        self.started = False
        self.cancel_request: Optional[_CancelRequest] = None

    def event(self, session_id: str, status: ActionStatus, worker: Optional[str]) -> ActionEvent:
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
            worker=worker,
            task_id=self.task_id,
        )


class LogForwarder(logging.Handler):
    """Logging handler that turns ``openjd.sessions`` records into ``LogEvent``s.

    Records of a Session that a registered driver owns carry that driver's worker and
    running action. With ``only_registered``, records of other Sessions and records
    without a session are dropped, which a worker process shared by several jobs needs.
    """

    def __init__(self, events: EventSink, *, only_registered: bool = False) -> None:
        super().__init__()
        self._events = events
        self._only_registered = only_registered
        self._drivers: dict[str, SessionDriver] = {}

    def register(self, driver: SessionDriver) -> None:
        self._drivers[driver.session_id] = driver

    def emit(self, record: logging.LogRecord) -> None:
        try:
            session_id = getattr(record, "session_id", None)
            driver = self._drivers.get(session_id) if isinstance(session_id, str) else None
            if driver is None and self._only_registered:
                return
            context = driver.current if driver is not None else None
            event = LogEvent(
                session_id=session_id,
                level=record.levelname,
                message=record.getMessage(),
                time=record.created,
                worker=driver.worker if driver is not None else None,
                action=context.kind if context is not None else None,
                step=context.step if context is not None else None,
                environment=context.environment if context is not None else None,
                task=context.task if context is not None else None,
                task_id=context.task_id if context is not None else None,
            )
            self._events.emit(event)
        except Exception:
            self.handleError(record)
