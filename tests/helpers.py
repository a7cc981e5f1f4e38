"""Shared helpers for the Session behaviour tests.

Build jobs and models from YAML, record session callbacks, collect ``openjd.sessions`` log
records, and create sessions that are always cleaned up. Test modules import this file by
name (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Union

import yaml
from openjd.model import (
    Job,
    JobParameterValues,
    ParameterValue,
    ParameterValueType,
    create_job,
    decode_job_template,
    parse_model,
    preprocess_job_parameters,
)
from openjd.model.v2023_09 import Environment, StepScript

from openjd.sessions import LOG, ActionState, ActionStatus, Session, SessionState

# The extensions that openjd-cli 0.7.5 enables by default.
ALL_EXTENSIONS = ("TASK_CHUNKING", "REDACTED_ENV_VARS", "FEATURE_BUNDLE_1")

# Upper bound for one action to end in these tests, used only to guard against hangs.
HANG_GUARD_SECONDS = 30.0

PYTHON = sys.executable


# ----- models ------------------------------------------------------------------------------


def build_job(
    template_yaml: str,
    parameters: Optional[Mapping[str, str]] = None,
    extensions: tuple[str, ...] = ALL_EXTENSIONS,
) -> tuple[Job, JobParameterValues]:
    """Decode a YAML job template, create its job and return it with the job parameter values.

    ``parameters`` maps job parameter names to values as strings, as on a command line.
    """
    document = yaml.safe_load(template_yaml)
    template = decode_job_template(template=document, supported_extensions=extensions)
    base_dir = Path.cwd()
    values = preprocess_job_parameters(
        job_template=template,
        job_parameter_values=dict(parameters or {}),
        job_template_dir=base_dir,
        current_working_dir=base_dir,
    )
    job = create_job(job_template=template, job_parameter_values=values)
    return job, values


def find_environment(job: Job, name: str) -> Environment:
    """Return the job or step environment called ``name``."""
    for environment in job.jobEnvironments or []:
        if environment.name == name:
            return environment
    for step in job.steps:
        for environment in step.stepEnvironments or []:
            if environment.name == name:
                return environment
    raise KeyError(f"The job has no environment named {name!r}")


def find_step_script(job: Job, name: Optional[str] = None) -> StepScript:
    """Return the script of the step called ``name``, or of the first step."""
    for step in job.steps:
        if name is None or step.name == name:
            return step.script
    raise KeyError(f"The job has no step named {name!r}")


def _document(source: Union[str, Mapping[str, Any]]) -> Any:
    return yaml.safe_load(source) if isinstance(source, str) else dict(source)


def step_script(source: Union[str, Mapping[str, Any]], extensions: tuple[str, ...] = ALL_EXTENSIONS) -> StepScript:
    """Parse a step script from YAML text or a dict, without a job around it.

    Format strings are kept unresolved, so this can express what ``create_job`` resolves
    (for example a ``timeout`` that references a job parameter).
    """
    return parse_model(model=StepScript, obj=_document(source), supported_extensions=extensions)


def environment(source: Union[str, Mapping[str, Any]], extensions: tuple[str, ...] = ALL_EXTENSIONS) -> Environment:
    """Parse an environment from YAML text or a dict."""
    return parse_model(model=Environment, obj=_document(source), supported_extensions=extensions)


def python_action(code: str, **fields: Any) -> dict[str, Any]:
    """Return an action that runs ``code`` with this interpreter, plus the keys in ``fields``.

    Template arguments cannot hold control characters, so code with several lines is
    passed as an ``exec()`` of its escaped text.
    """
    if "\n" in code:
        code = f"exec({code!r})"
    return {"command": PYTHON, "args": ["-c", code], **fields}


def python_step(code: str, **fields: Any) -> StepScript:
    """Return a step script whose ``onRun`` runs ``code`` with this interpreter."""
    return step_script({"actions": {"onRun": python_action(code, **fields)}})


def shell_step(script: str, **fields: Any) -> StepScript:
    """Return a step script whose ``onRun`` runs ``script`` with ``/bin/sh -c``."""
    return step_script({"actions": {"onRun": {"command": "/bin/sh", "args": ["-c", script], **fields}}})


def parameter_values(**values: Union[str, tuple[str, str]]) -> dict[str, ParameterValue]:
    """Build job or task parameter values: ``Name="text"`` or ``Name=("INT", "3")``."""
    result: dict[str, ParameterValue] = {}
    for name, value in values.items():
        if isinstance(value, tuple):
            type_name, text = value
        else:
            type_name, text = "STRING", value
        result[name] = ParameterValue(type=ParameterValueType(type_name), value=text)
    return result


# ----- callbacks ---------------------------------------------------------------------------


class CallbackCall(NamedTuple):
    thread_name: str
    status: ActionStatus


class CallbackRecorder:
    """A session callback that records ``(thread name, ActionStatus)`` for every call.

    ``wait_final()`` blocks until the callback has seen a state other than ``RUNNING`` and
    consumes that end, so one call per action waits for each action in turn.
    """

    def __init__(self, on_call: Optional[Callable[[str, ActionStatus], None]] = None) -> None:
        self.calls: list[CallbackCall] = []
        self.session_ids: list[str] = []
        self._on_call = on_call
        self._lock = threading.Lock()
        self._ended = threading.Event()
        self._finals: list[ActionStatus] = []
        self._consumed = 0

    def __call__(self, session_id: str, status: ActionStatus) -> None:
        with self._lock:
            self.calls.append(CallbackCall(threading.current_thread().name, status))
            self.session_ids.append(session_id)
            if status.state != ActionState.RUNNING:
                self._finals.append(status)
                self._ended.set()
        if self._on_call is not None:
            self._on_call(session_id, status)

    @property
    def statuses(self) -> list[ActionStatus]:
        with self._lock:
            return [call.status for call in self.calls]

    @property
    def states(self) -> list[ActionState]:
        return [status.state for status in self.statuses]

    def wait_final(self, timeout: float = HANG_GUARD_SECONDS) -> ActionStatus:
        """Return the next final status not returned before; fail the test on a hang."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._consumed < len(self._finals):
                    status = self._finals[self._consumed]
                    self._consumed += 1
                    if self._consumed == len(self._finals):
                        self._ended.clear()
                    return status
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"No final callback within {timeout} s. Calls so far: {self.calls}")
            self._ended.wait(remaining)

    def clear(self) -> None:
        """Forget the calls recorded so far (finals already waited for stay consumed)."""
        with self._lock:
            self.calls.clear()
            self.session_ids.clear()


# ----- logs --------------------------------------------------------------------------------


class LogEntry(NamedTuple):
    levelname: str
    content: Any
    """The record's ``openjd_log_content`` (a ``LogContent``), or None when it has none."""
    session_id: Optional[str]
    msg: Any
    """``record.msg``: the template before %-formatting."""
    message: str
    """``record.getMessage()``."""


_MISSING = object()


class LogCollector(logging.Handler):
    """Collects every record that reaches handlers of the ``openjd.sessions`` logger."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.entries: list[LogEntry] = []
        self.records: list[logging.LogRecord] = []
        self._entries_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        content = getattr(record, "openjd_log_content", _MISSING)
        entry = LogEntry(
            levelname=record.levelname,
            content=None if content is _MISSING else content,
            session_id=getattr(record, "session_id", None),
            msg=record.msg,
            message=record.getMessage(),
        )
        with self._entries_lock:
            self.entries.append(entry)
            self.records.append(record)

    def snapshot(self, session_id: Optional[str] = None) -> list[LogEntry]:
        """Return the entries so far, only those of ``session_id`` if given."""
        with self._entries_lock:
            entries = list(self.entries)
        if session_id is not None:
            entries = [entry for entry in entries if entry.session_id == session_id]
        return entries

    def messages(self, session_id: Optional[str] = None) -> list[str]:
        return [entry.message for entry in self.snapshot(session_id)]

    def text(self) -> str:
        return "\n".join(self.messages())

    def find(self, predicate: Callable[[LogEntry], bool]) -> list[LogEntry]:
        return [entry for entry in self.snapshot() if predicate(entry)]

    def starting_with(self, prefix: str) -> list[LogEntry]:
        return self.find(lambda entry: entry.message.startswith(prefix))

    def clear(self) -> None:
        with self._entries_lock:
            self.entries.clear()
            self.records.clear()

    @contextmanager
    def attached(self, level: Optional[int] = None) -> Iterator[LogCollector]:
        """Attach to ``LOG`` for the block; ``level`` sets the logger level meanwhile."""
        previous_level = LOG.level
        LOG.addHandler(self)
        if level is not None:
            LOG.setLevel(level)
        try:
            yield self
        finally:
            LOG.removeHandler(self)
            LOG.setLevel(previous_level)


# ----- sessions ----------------------------------------------------------------------------


# The id each session was created with, because Session has no public attribute for it.
_session_ids: weakref.WeakKeyDictionary[Session, str] = weakref.WeakKeyDictionary()


def session_id_of(session: Session) -> str:
    """Return the id that a ``SessionFactory`` created ``session`` with."""
    return _session_ids[session]


class SessionFactory:
    """Creates sessions under one root directory and ends all of them afterwards."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sessions: list[Session] = []
        self._count = 0

    def __call__(self, **kwargs: Any) -> Session:
        self._count += 1
        # Unique ids keep sessions of different tests apart in the shared logger.
        kwargs.setdefault("session_id", f"test-session-{self._count}-{uuid.uuid4().hex[:8]}")
        kwargs.setdefault("job_parameter_values", {})
        kwargs.setdefault("session_root_directory", self.root)
        session = Session(**kwargs)
        _session_ids[session] = kwargs["session_id"]
        self.sessions.append(session)
        return session

    def close(self) -> None:
        for session in self.sessions:
            if session.state == SessionState.RUNNING:
                try:
                    session.cancel_action(time_limit=timedelta(0))
                except RuntimeError:
                    pass
                wait_until(lambda s=session: s.state != SessionState.RUNNING, 10)
            session.cleanup()


def wait_until(predicate: Callable[[], bool], timeout: float = HANG_GUARD_SECONDS, poll: float = 0.01) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return predicate()


def wait_for_file(path: Path, timeout: float = HANG_GUARD_SECONDS) -> str:
    """Wait until ``path`` exists and is not empty, then return its text."""
    if not wait_until(lambda: path.exists() and path.stat().st_size > 0, timeout):
        raise AssertionError(f"{path} was not written within {timeout} s")
    return path.read_text()


def pid_alive(pid: int) -> bool:
    """Tell whether ``pid`` runs and is not a zombie, without sending a real signal."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            state = stat_file.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state != "Z"


def kill_quietly(pids: list[int]) -> None:
    """SIGKILL processes that a test started, ignoring those already gone."""
    import signal

    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
