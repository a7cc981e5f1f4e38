"""Tests for the deliberate differences from upstream openjd-sessions 0.10.8.

Each test runs real sessions with real child processes and checks one of the behaviours
where this library does better than upstream: file names, secrets, shell quoting, helper
programs, output handling, cancelation of whole process trees, cleanup and callbacks.
The sections below follow the numbered rows of ``docs/deviations.md``, which lists the
behaviour each test covers.

Child programs are Python scripts written to the test's directory and run with the
interpreter that runs the tests. Timeouts only guard against hangs.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import queue
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable, NamedTuple, Optional

import pytest
from openjd.model import (
    ParameterValue,
    ParameterValueType,
    RevisionExtensions,
    SpecificationRevision,
)
from openjd.model.v2023_09 import (
    Environment,
    EnvironmentVariableValueString,
    ModelParsingContext,
    StepScript,
)

from openjd.sessions import (
    LOG,
    ActionState,
    ActionStatus,
    LogContent,
    PathFormat,
    PathMappingRule,
    Session,
    SessionState,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="runs POSIX child processes on Linux")

# Timeouts guard against hangs only. Every wait normally ends within a second or two.
HANG_GUARD = 60.0
EXTENSIONS = ["TASK_CHUNKING", "REDACTED_ENV_VARS", "FEATURE_BUNDLE_1"]
MODEL_CONTEXT = ModelParsingContext(supported_extensions=EXTENSIONS)
REDACTION = RevisionExtensions(spec_rev=SpecificationRevision.v2023_09, supported_extensions=EXTENSIONS)
MASK = "********"
TRACKING_ENV_VAR = "OPENJD_SESSIONS_PROCESS_TRACKING"
LINE_LIMIT = 64_000
TERMINAL_STATES = (ActionState.SUCCESS, ActionState.FAILED, ActionState.CANCELED, ActionState.TIMEOUT)


# ----- child programs ---------------------------------------------------------------------

# Prints each argument as one line.
PRINT_ARGS = """
import sys
for line in sys.argv[1:]:
    print(line, flush=True)
"""

# Prints each argument, given as hex-encoded UTF-8, as one line. Secrets travel this way so that
# they do not appear in the logged command line before the session registers them.
PRINT_HEX_ARGS = """
import sys
for line in sys.argv[1:]:
    print(bytes.fromhex(line).decode(), flush=True)
"""

# Prints the arguments after the first, creates the file named by the first, then sleeps.
PRINT_THEN_SLEEP = """
import sys, time
for line in sys.argv[2:]:
    print(line, flush=True)
open(sys.argv[1], "w").close()
time.sleep(300)
"""

# Writes its arguments, working directory and environment as JSON to the file named by the
# first argument.
DUMP_PROCESS = """
import json, os, sys
with open(sys.argv[1], "w", encoding="utf-8") as file:
    json.dump({"argv": sys.argv[2:], "cwd": os.getcwd(), "env": dict(os.environ)}, file)
"""

# Handles SIGTERM by creating <dir>/got_sigterm when the second argument is "record", and
# ignores it otherwise. Creates <dir>/ready, then sleeps.
NOTIFY_CHILD = """
import os, signal, sys, time
directory, mode = sys.argv[1], sys.argv[2]
def on_term(signum, frame):
    open(os.path.join(directory, "got_sigterm"), "w").close()
signal.signal(signal.SIGTERM, on_term if mode == "record" else signal.SIG_IGN)
open(os.path.join(directory, "ready"), "w").close()
time.sleep(300)
"""

# Builds a process tree that escapes the action's process group, writes every pid to
# <dir>/pids.json and creates <dir>/ready. Every process ignores SIGTERM and sleeps.
#   kept:     a child that calls setsid() while its parent, the main process, stays alive.
#   orphan:   a grandchild that calls setsid() and whose parent exits at once.
#   group:    a child that moves to a process group of its own with setpgid().
# The second argument selects the mode:
#   stay (default)  all of the above, and the main process stays alive.
#   exit-holding    only the orphan, which keeps the output pipe open, and the main process exits.
#   exit-detached   only the orphan, with its output on /dev/null, and the main process exits.
# Descendants other than a holding orphan write their output to /dev/null, so that the
# action ends as soon as its main process does.
PROCESS_TREE = """
import json, os, signal, sys, time
directory = sys.argv[1]
mode = sys.argv[2] if len(sys.argv) > 2 else "stay"
signal.signal(signal.SIGTERM, signal.SIG_IGN)

def write_pid(name):
    path = os.path.join(directory, name + ".pid")
    with open(path + ".tmp", "w") as file:
        file.write(str(os.getpid()))
    os.rename(path + ".tmp", path)

def detach_output():
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)

def fork_child(name, new_session, new_group=False, hold_output=False):
    pid = os.fork()
    if pid == 0:
        if not hold_output:
            detach_output()
        if new_session:
            os.setsid()
        if new_group:
            os.setpgid(0, 0)
        write_pid(name)
        while True:
            time.sleep(300)
    return pid

pids = {"main": os.getpid()}
if mode == "stay":
    pids["kept"] = fork_child("kept", new_session=True)
    pids["group"] = fork_child("group", new_session=False, new_group=True)
parent = os.fork()
if parent == 0:
    fork_child("orphan", new_session=True, hold_output=mode == "exit-holding")
    os._exit(0)
os.waitpid(parent, 0)
deadline = time.monotonic() + 30
while not os.path.exists(os.path.join(directory, "orphan.pid")) and time.monotonic() < deadline:
    time.sleep(0.01)
with open(os.path.join(directory, "orphan.pid")) as file:
    pids["orphan"] = int(file.read())
with open(os.path.join(directory, "pids.json"), "w") as file:
    json.dump(pids, file)
open(os.path.join(directory, "ready"), "w").close()
print("tree ready", flush=True)
if mode == "stay":
    while True:
        time.sleep(300)
"""


# ----- helpers ----------------------------------------------------------------------------


def write_child(directory: Path, name: str, source: str) -> Path:
    """Write a child program to ``directory/name`` and return its path."""
    path = directory / name
    path.write_text(textwrap.dedent(source).lstrip(), encoding="utf-8")
    return path


def hex_args(*lines: str) -> list[str]:
    return [line.encode().hex() for line in lines]


def python_action(script: Path, *args: str, **fields: Any) -> dict[str, Any]:
    """Return a template action that runs ``script`` with ``args``."""
    return {"command": sys.executable, "args": [str(script), *args], **fields}


def step_script(on_run: dict[str, Any], embedded_files: Optional[list[dict[str, Any]]] = None) -> StepScript:
    document: dict[str, Any] = {"actions": {"onRun": on_run}}
    if embedded_files:
        document["embeddedFiles"] = embedded_files
    return StepScript.model_validate(document, context=MODEL_CONTEXT)


def environment(
    name: str,
    *,
    on_enter: Optional[dict[str, Any]] = None,
    on_exit: Optional[dict[str, Any]] = None,
    variables: Optional[dict[str, str]] = None,
) -> Environment:
    document: dict[str, Any] = {"name": name}
    actions = {key: value for key, value in (("onEnter", on_enter), ("onExit", on_exit)) if value}
    if actions:
        document["script"] = {"actions": actions}
    if variables is not None:
        document["variables"] = variables
    return Environment.model_validate(document, context=MODEL_CONTEXT)


def string_parameters(**values: str) -> dict[str, ParameterValue]:
    return {name: ParameterValue(type=ParameterValueType.STRING, value=value) for name, value in values.items()}


def wait_for(condition: Callable[[], bool], what: str, timeout: float = HANG_GUARD) -> None:
    """Poll ``condition`` until it is true, and fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)


def process_state(pid: int) -> Optional[str]:
    """Return the state letter from ``/proc/<pid>/stat``, or None if no such process."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return data[data.rfind(b")") + 2 :].split()[0].decode()


def is_alive(pid: int) -> bool:
    """Return True while ``pid`` runs. A zombie counts as ended."""
    return process_state(pid) not in (None, "Z", "X")


# Kernel flag in field 9 of /proc/<pid>/stat: the process has started to exit.
PF_EXITING = 0x4
SIGKILL_BIT = 1 << (signal.SIGKILL - 1)


def runs_on(pid: int) -> bool:
    """Return True if ``pid`` can still run its own code.

    A process that is a zombie, has started to exit, or has SIGKILL pending never runs user
    code again, so it counts as ended even though it may take a moment to disappear.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    fields = stat[stat.rfind(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X") or int(fields[6]) & PF_EXITING:
        return False
    pending = 0
    for line in status.splitlines():
        if line.startswith(("SigPnd:", "ShdPnd:")):
            pending |= int(line.split()[1], 16)
    return not pending & SIGKILL_BIT


def running_processes(pids: dict[str, int], settle: float = 0.5) -> list[str]:
    """Return the names of the processes in ``pids`` that can still run their own code.

    A killed process looks runnable for a moment between taking SIGKILL off its pending set
    and marking itself as exiting, so a process counts as ended if it stops looking runnable
    within ``settle`` seconds.
    """
    deadline = time.monotonic() + settle
    while True:
        running = [name for name, pid in pids.items() if runs_on(pid)]
        if not running or time.monotonic() >= deadline:
            return running
        time.sleep(0.01)


def process_ended(pid: int) -> Callable[[], bool]:
    """Return a condition for ``wait_for`` that is true once ``pid`` no longer runs."""
    return lambda: not is_alive(pid)


def read_pids(directory: Path) -> dict[str, int]:
    return {name: int(pid) for name, pid in json.loads((directory / "pids.json").read_text()).items()}


class Recorder:
    """A session callback that stores every status it receives."""

    def __init__(self, session_id: str = "") -> None:
        self.session_id = session_id
        """The id of the session that the factory created with this recorder."""
        self.statuses: list[ActionStatus] = []
        self._changed = threading.Condition()

    def __call__(self, session_id: str, status: ActionStatus) -> None:
        with self._changed:
            self.statuses.append(status)
            self._changed.notify_all()

    def mark(self) -> int:
        with self._changed:
            return len(self.statuses)

    def wait_final(self, since: int, timeout: float = HANG_GUARD) -> ActionStatus:
        """Return the first terminal status received at index ``since`` or later."""
        with self._changed:
            found = self._changed.wait_for(lambda: self._final_after(since) is not None, timeout)
            if not found:
                pytest.fail(f"no terminal status within {timeout:.0f} s; received {self.statuses[since:]}")
            final = self._final_after(since)
            assert final is not None
            return final

    def _final_after(self, since: int) -> Optional[ActionStatus]:
        return next((s for s in self.statuses[since:] if s.state in TERMINAL_STATES), None)


def run_and_wait(recorder: Recorder, start: Callable[[], object], timeout: float = HANG_GUARD) -> ActionStatus:
    """Call ``start`` (which starts one action) and return that action's terminal status."""
    since = recorder.mark()
    start()
    return recorder.wait_final(since, timeout)


def start_task(session: Session, script: StepScript) -> None:
    """Start one task without task parameters, and return once its process runs."""
    session.run_task(step_script=script, task_parameter_values={})


def run_task_and_wait(
    session: Session, recorder: Recorder, script: StepScript, *, timeout: float = HANG_GUARD, **arguments: Any
) -> ActionStatus:
    """Run one task without task parameters and return its terminal status.

    ``arguments`` go to ``Session.run_task``, and ``timeout`` guards against a hang.
    """
    return run_and_wait(
        recorder, lambda: session.run_task(step_script=script, task_parameter_values={}, **arguments), timeout
    )


class RecordStore(logging.Handler):
    """A log handler that keeps every record of the ``openjd.sessions`` logger."""

    def __init__(self) -> None:
        super().__init__(level=logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, session_id: Optional[str] = None) -> list[str]:
        return [
            record.getMessage()
            for record in list(self.records)
            if session_id is None or getattr(record, "session_id", None) == session_id
        ]

    def output(self, session_id: str) -> list[str]:
        """Messages of the session's process-output records, in order."""
        return [
            record.getMessage()
            for record in list(self.records)
            if getattr(record, "session_id", None) == session_id
            and getattr(record, "openjd_log_content", None) == LogContent.COMMAND_OUTPUT
        ]


@pytest.fixture
def log_store() -> Iterator[RecordStore]:
    store = RecordStore()
    LOG.addHandler(store)
    try:
        yield store
    finally:
        LOG.removeHandler(store)


@pytest.fixture
def restore_log_level() -> Iterator[None]:
    level = LOG.level
    try:
        yield
    finally:
        LOG.setLevel(level)


SessionFactory = Callable[..., "tuple[Session, Recorder]"]


@pytest.fixture
def new_session(tmp_path: Path) -> Iterator[SessionFactory]:
    """Create sessions under the test's directory, with a ``Recorder`` as callback.

    Every session is cleaned up at the end of the test, which also kills processes its
    actions left running.
    """
    sessions: list[Session] = []
    root = tmp_path / "sessions"
    root.mkdir()

    def make(**arguments: Any) -> tuple[Session, Recorder]:
        arguments.setdefault("session_id", f"deviation{len(sessions)}")
        recorder = Recorder(arguments["session_id"])
        arguments.setdefault("job_parameter_values", {})
        arguments.setdefault("session_root_directory", root)
        arguments.setdefault("callback", recorder)
        session = Session(**arguments)
        sessions.append(session)
        return session, recorder

    yield make
    for session in sessions:
        session.cleanup()


@pytest.fixture
def kill_leftovers(tmp_path: Path) -> Iterator[list[int]]:
    """Pids to SIGKILL after the test if they still run a program from the test's directory."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(tmp_path).encode() in cmdline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def use_tracking(mechanism: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Make new sessions track processes with ``mechanism``; skip if cgroups are not available."""
    monkeypatch.setenv(TRACKING_ENV_VAR, mechanism)
    if mechanism != "cgroup":
        return
    probe_root = tmp_path / "cgroup-probe"
    probe_root.mkdir()
    try:
        Session(session_id="cgroup-probe", job_parameter_values={}, session_root_directory=probe_root).cleanup()
    except RuntimeError as err:
        pytest.skip(f"cgroup process tracking is not available here: {err}")


@pytest.fixture(params=["cgroup", "process-group"])
def tracking(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """Run the test with each process-tracking mechanism."""
    mechanism: str = request.param
    use_tracking(mechanism, monkeypatch, tmp_path)
    return mechanism


# ----- 1. embedded file names ---------------------------------------------------------------


@pytest.mark.parametrize(
    "filename", ["../escape.txt", "../../../escape.txt", "ABSOLUTE", "sub/inner.txt", "..", "planted-link"]
)
@pytest.mark.parametrize("where", ["task", "environment"])
def test_embedded_filename_outside_directory_rejected(
    new_session: SessionFactory, tmp_path: Path, filename: str, where: str
) -> None:
    session, recorder = new_session()
    outside = tmp_path / "outside.txt"
    if filename == "ABSOLUTE":
        filename = str(outside)
    if filename == "planted-link":
        (session.files_directory / filename).symlink_to(outside)
    ran_marker = tmp_path / "command-ran"
    marker_script = write_child(tmp_path, "touch.py", "import sys; open(sys.argv[1], 'w').close()")
    files = [{"name": "Payload", "type": "TEXT", "filename": filename, "data": "escaped data\n"}]
    prefix = "Task.File" if where == "task" else "Env.File"
    action = python_action(marker_script, str(ran_marker), f"{{{{{prefix}.Payload}}}}")
    before = {path for path in tmp_path.rglob("*") if session.working_directory not in path.parents}

    if where == "task":
        final = run_task_and_wait(session, recorder, step_script(action, files))
    else:
        env = Environment.model_validate(
            {"name": "Files", "script": {"actions": {"onEnter": action}, "embeddedFiles": files}},
            context=MODEL_CONTEXT,
        )
        final = run_and_wait(recorder, lambda: session.enter_environment(environment=env))

    assert final.state == ActionState.FAILED
    assert final.exit_code is None
    assert final.fail_message is not None
    assert filename in final.fail_message
    assert "Payload" in final.fail_message
    assert "file name" in final.fail_message
    assert session.state == SessionState.READY_ENDING
    assert not ran_marker.exists()
    assert not outside.exists()
    after = {path for path in tmp_path.rglob("*") if session.working_directory not in path.parents}
    assert after == before
    assert not (session.working_directory / "escape.txt").exists()


# ----- 2. secrets are never logged ----------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "secret"),
    [
        ("openjd_redacted_env: NOEQUALSs3cr3tA", "NOEQUALSs3cr3tA"),
        ("openjd_redacted_env: 1BAD=s3cr3tB", "s3cr3tB"),
        ('openjd_redacted_env: "JSON=s3cr3tC', "s3cr3tC"),
        ('openjd_redacted_env: "JSON=s3cr3tD" trailing', "s3cr3tD"),
        ("openjd_redacted_env:NAME=s3cr3tE", "s3cr3tE"),
        ("  OPENJD_REDACTED_ENV: NAME=s3cr3tF", "s3cr3tF"),
    ],
)
def test_malformed_redacted_payload_still_masked(
    new_session: SessionFactory, tmp_path: Path, log_store: RecordStore, line: str, secret: str
) -> None:
    session, recorder = new_session(revision_extensions=REDACTION)
    printer = write_child(tmp_path, "print_args.py", PRINT_ARGS)
    hex_printer = write_child(tmp_path, "print_hex_args.py", PRINT_HEX_ARGS + "import time; time.sleep(300)\n")
    env = environment(
        "Secrets",
        on_enter=python_action(hex_printer, *hex_args(line)),
        on_exit=python_action(printer, f"exit sees {secret}"),
    )

    entered = run_and_wait(recorder, lambda: session.enter_environment(environment=env, identifier="secrets"))
    LOG.info("host echo %s", secret, extra={"session_id": recorder.session_id})
    exited = run_and_wait(recorder, lambda: session.exit_environment(identifier="secrets"))

    assert entered.state == ActionState.FAILED
    assert exited.state == ActionState.SUCCESS
    messages = log_store.messages(recorder.session_id)
    assert any("redacted_env" in message.lower() and MASK in message for message in messages)
    assert "exit sees " + MASK in messages
    assert "host echo " + MASK in messages
    leaks = [message for message in messages if secret in message]
    assert leaks == []
    for status in recorder.statuses:
        assert secret not in str(status.fail_message)
        assert secret not in str(status.status_message)


def test_secret_masked_in_status_and_fail(new_session: SessionFactory, tmp_path: Path) -> None:
    secret = "hunter2-status"
    session, recorder = new_session(revision_extensions=REDACTION)
    printer = write_child(tmp_path, "print_args.py", PRINT_ARGS)
    hex_printer = write_child(tmp_path, "print_hex_args.py", PRINT_HEX_ARGS)
    env = environment("Token", on_enter=python_action(hex_printer, *hex_args(f"openjd_redacted_env: TOKEN={secret}")))
    task = step_script(python_action(printer, f"openjd_status: using {secret} now", f"openjd_fail: rejected {secret}"))

    run_and_wait(recorder, lambda: session.enter_environment(environment=env))
    since = recorder.mark()
    final = run_task_and_wait(session, recorder, task)

    assert final.state == ActionState.SUCCESS
    assert final.status_message == f"using {MASK} now"
    assert final.fail_message == f"rejected {MASK}"
    assert session.action_status is not None
    assert session.action_status.status_message == f"using {MASK} now"
    assert session.action_status.fail_message == f"rejected {MASK}"
    for status in recorder.statuses[since:]:
        assert secret not in str(status.status_message)
        assert secret not in str(status.fail_message)


def test_secret_masked_in_debug_dumps(
    new_session: SessionFactory, tmp_path: Path, log_store: RecordStore, restore_log_level: None
) -> None:
    secret = "hunter2-debug"
    LOG.setLevel(logging.DEBUG)
    session, recorder = new_session(revision_extensions=REDACTION)
    printer = write_child(tmp_path, "print_args.py", PRINT_ARGS)
    hex_printer = write_child(tmp_path, "print_hex_args.py", PRINT_HEX_ARGS)
    env = environment("Token", on_enter=python_action(hex_printer, *hex_args(f"openjd_redacted_env: TOKEN={secret}")))
    files = [{"name": "Config", "type": "TEXT", "data": f"token = {secret}\n"}]
    task = step_script(python_action(printer, f"argument {secret}", "{{Task.File.Config}}"), files)

    run_and_wait(recorder, lambda: session.enter_environment(environment=env))
    task_status = run_task_and_wait(session, recorder, task)
    subprocess_status = run_and_wait(
        recorder,
        lambda: session.run_subprocess(command=sys.executable, args=[str(printer), f"subprocess {secret}"]),
    )

    assert task_status.state == ActionState.SUCCESS
    assert subprocess_status.state == ActionState.SUCCESS
    records = [record for record in log_store.records if getattr(record, "session_id", None) == recorder.session_id]
    contents = [
        r.getMessage() for r in records if r.levelno == logging.DEBUG and r.getMessage().startswith("Contents:")
    ]
    assert contents == [f"Contents:\ntoken = {MASK}\n"]
    commands = [r.getMessage() for r in records if r.getMessage().startswith("Running command")]
    assert len(commands) == 3
    assert f"argument {MASK}" in commands[1]
    assert f"subprocess {MASK}" in commands[2]
    assert [r.getMessage() for r in records if secret in r.getMessage()] == []


# ----- 3. redaction is per session ----------------------------------------------------------


def test_secret_not_masked_in_other_session(
    new_session: SessionFactory, tmp_path: Path, log_store: RecordStore
) -> None:
    secret = "shared-text-42"
    owner, owner_recorder = new_session(session_id="owner", revision_extensions=REDACTION)
    other, other_recorder = new_session(session_id="other", revision_extensions=REDACTION)
    printer = write_child(tmp_path, "print_args.py", PRINT_ARGS)
    hex_printer = write_child(tmp_path, "print_hex_args.py", PRINT_HEX_ARGS)
    env = environment("Token", on_enter=python_action(hex_printer, *hex_args(f"openjd_redacted_env: TOKEN={secret}")))
    echo = step_script(python_action(printer, f"echo {secret}"))

    run_and_wait(owner_recorder, lambda: owner.enter_environment(environment=env))
    run_task_and_wait(owner, owner_recorder, echo)
    run_task_and_wait(other, other_recorder, echo)
    LOG.info("host record for owner %s", secret, extra={"session_id": "owner"})
    LOG.info("host record for other %s", secret, extra={"session_id": "other"})
    LOG.info("host record without session %s", secret)

    assert f"echo {MASK}" in log_store.output("owner")
    assert f"echo {secret}" in log_store.output("other")
    messages = log_store.messages()
    assert f"host record for owner {MASK}" in messages
    assert f"host record for other {secret}" in messages
    assert f"host record without session {secret}" in messages


# ----- 4. only process output is protocol ---------------------------------------------------


def test_host_records_not_parsed_as_messages(
    new_session: SessionFactory, tmp_path: Path, log_store: RecordStore
) -> None:
    session, recorder = new_session()
    gate = tmp_path / "release"
    waiter = write_child(
        tmp_path,
        "wait_then_print.py",
        """
        import os, sys, time
        open(sys.argv[1], "w").close()
        while not os.path.exists(sys.argv[2]):
            time.sleep(0.01)
        for line in sys.argv[3:]:
            print(line, flush=True)
        """,
    )
    env = environment(
        "Gate",
        on_enter=python_action(waiter, str(tmp_path / "env-ready"), str(gate), "openjd_env: FROM_PROCESS=1"),
    )
    task = step_script(
        python_action(waiter, str(tmp_path / "task-ready"), str(gate) + "2", "openjd_status: from process")
    )
    dump = write_child(tmp_path, "dump.py", DUMP_PROCESS)
    dump_file = tmp_path / "dump.json"
    sid = {"session_id": recorder.session_id}

    since = recorder.mark()
    session.enter_environment(environment=env)
    wait_for((tmp_path / "env-ready").exists, "the onEnter action to start")
    LOG.info("openjd_env: FROM_HOST=1", extra=sid)
    LOG.info("openjd_unset_env: PATH", extra=sid)
    LOG.info("openjd_environment is ready", extra=sid)
    gate.touch()
    entered = recorder.wait_final(since)

    since = recorder.mark()
    start_task(session, task)
    wait_for((tmp_path / "task-ready").exists, "the task to start")
    for line in ("openjd_status: from host", "openjd_progress: 50", "openjd_fail: from host"):
        LOG.info(line, extra=sid)
    LOG.info("openjd_session_runtime_loglevel: ERROR", extra=sid)
    Path(str(gate) + "2").touch()
    task_status = recorder.wait_final(since)
    LOG.info("openjd_env: BETWEEN=1", extra=sid)
    LOG.info("Openjd_env: BETWEEN=2", extra=sid)
    dumped = run_task_and_wait(session, recorder, step_script(python_action(dump, str(dump_file))))

    assert entered.state == ActionState.SUCCESS
    assert entered.fail_message is None
    assert task_status.state == ActionState.SUCCESS
    assert task_status.status_message == "from process"
    assert task_status.progress is None
    assert task_status.fail_message is None
    for status in recorder.statuses:
        assert status.status_message in (None, "from process")
    assert dumped.state == ActionState.SUCCESS
    env_seen = json.loads(dump_file.read_text())["env"]
    assert env_seen["FROM_PROCESS"] == "1"
    assert "FROM_HOST" not in env_seen
    assert "BETWEEN" not in env_seen
    assert "PATH" in env_seen
    assert LOG.getEffectiveLevel() == logging.INFO
    messages = log_store.messages(recorder.session_id)
    after_host_level = messages[messages.index("openjd_session_runtime_loglevel: ERROR") + 1 :]
    assert any(message.startswith("Command started as pid") for message in after_host_level)


# ----- 5. no shell injection ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["A-B", "1ABC", "A B", "A=B", "", "X;touch"])
@pytest.mark.parametrize(
    "method", ["constructor", "enter_environment", "exit_environment", "run_task", "run_subprocess"]
)
def test_invalid_os_env_var_name_rejected(new_session: SessionFactory, tmp_path: Path, method: str, name: str) -> None:
    bad = {"GOOD": "1", name: "value"}
    if method == "constructor":
        with pytest.raises(ValueError) as raised:
            new_session(os_env_vars=bad)
        assert repr(name) in str(raised.value)
        assert list((tmp_path / "sessions").iterdir()) == []
        return

    session, recorder = new_session()
    printer = write_child(tmp_path, "print_args.py", PRINT_ARGS)
    env = environment("Plain", variables={"PLAIN": "1"})
    task = step_script(python_action(printer, "task ran"))
    starts: dict[str, Callable[[], object]] = {
        "enter_environment": lambda: session.enter_environment(environment=env, os_env_vars=bad),
        "exit_environment": lambda: session.exit_environment(identifier="plain", os_env_vars=bad),
        "run_task": lambda: session.run_task(step_script=task, task_parameter_values={}, os_env_vars=bad),
        "run_subprocess": lambda: session.run_subprocess(command=sys.executable, args=[str(printer)], os_env_vars=bad),
    }
    if method == "exit_environment":
        run_and_wait(recorder, lambda: session.enter_environment(environment=env, identifier="plain"))
    since = recorder.mark()

    with pytest.raises(ValueError) as raised:
        starts[method]()

    assert repr(name) in str(raised.value)
    assert "os_env_vars" in str(raised.value)
    assert session.state == SessionState.READY
    assert recorder.statuses[since:] == []


def test_invalid_template_variable_name_fails_action(new_session: SessionFactory, tmp_path: Path) -> None:
    # openjd-model rejects such a name when it validates a template, so build the model
    # without validation, as a client that creates models in code could.
    session, recorder = new_session()
    printer = write_child(tmp_path, "print_args.py", PRINT_ARGS)
    validated = environment("BadName", on_enter=python_action(printer, "entered"), variables={"GOOD": "1"})
    variables = {"A-B": EnvironmentVariableValueString("x", context=MODEL_CONTEXT)}
    bad_env = validated.model_copy(update={"variables": variables})

    final = run_and_wait(recorder, lambda: session.enter_environment(environment=bad_env))

    assert final.state == ActionState.FAILED
    assert final.fail_message is not None
    assert "A-B" in final.fail_message
    assert session.state == SessionState.READY_ENDING


@pytest.mark.parametrize("line", ["openjd_env: A-B=1", "openjd_env: 9LIVES=1", 'openjd_env: "A B=1"'])
def test_invalid_openjd_env_name_fails_action(new_session: SessionFactory, tmp_path: Path, line: str) -> None:
    session, recorder = new_session()
    sleeper = write_child(tmp_path, "print_then_sleep.py", PRINT_THEN_SLEEP)
    env = environment("BadLine", on_enter=python_action(sleeper, str(tmp_path / "ready"), line))

    final = run_and_wait(recorder, lambda: session.enter_environment(environment=env))

    assert final.state == ActionState.FAILED
    assert final.fail_message is not None
    name = line.split(": ", 1)[1].strip('"').split("=")[0]
    assert name in final.fail_message
    assert session.state == SessionState.READY_ENDING


INJECTION_TEXTS = [
    "$(touch pwned1)",
    "`touch pwned2`",
    "'; touch pwned3; '",
    '"; touch pwned4; "',
    "a b\\ c",
    "x && touch pwned5 || touch pwned6",
    "$HOME ${PATH} $$ *",
    "> pwned7 < /dev/null | cat",
]


def test_shell_metacharacters_reach_process_literally(new_session: SessionFactory, tmp_path: Path) -> None:
    root = tmp_path / "root 'q' \"dq\" $(touch pwned8) `touch pwned9`"
    root.mkdir()
    session_id = "sid'\"$(touch pwned10)`x`;&|"
    variables = {f"INJECT_{index}": text for index, text in enumerate(INJECTION_TEXTS)}
    session, recorder = new_session(session_id=session_id, session_root_directory=root, os_env_vars=variables)
    dump = write_child(tmp_path, "dump.py", DUMP_PROCESS)
    task_dump, subprocess_dump = tmp_path / "task.json", tmp_path / "subprocess.json"
    task = step_script(python_action(dump, str(task_dump), *INJECTION_TEXTS, "{{Session.WorkingDirectory}}"))

    task_status = run_task_and_wait(session, recorder, task)
    subprocess_status = run_and_wait(
        recorder,
        lambda: session.run_subprocess(
            command=sys.executable, args=[str(dump), str(subprocess_dump), *INJECTION_TEXTS], os_env_vars=variables
        ),
    )

    assert task_status.state == ActionState.SUCCESS
    assert subprocess_status.state == ActionState.SUCCESS
    working_directory = str(session.working_directory)
    assert working_directory.startswith(str(root))
    assert Path(working_directory).name.startswith(session_id)
    for dump_file, extra_args in ((task_dump, [working_directory]), (subprocess_dump, [])):
        seen = json.loads(dump_file.read_text(encoding="utf-8"))
        assert seen["argv"] == INJECTION_TEXTS + extra_args
        assert seen["cwd"] == working_directory
        assert seen["env"]["OPENJD_SESSION_WORKING_DIR"] == working_directory
        for name, value in variables.items():
            assert seen["env"][name] == value
    assert [path.name for path in tmp_path.rglob("pwned*")] == []
    assert [path.name for path in Path.cwd().glob("pwned*")] == []


# ----- 6. helper programs from trusted places -----------------------------------------------

FAKE_HELPERS = ["kill", "ps", "sudo", "pkill", "pgrep", "setsid", "rm", "sh", "bash", "env", "killall", "pidof"]


# Runs a session in a process whose kill() system call always fails with EPERM, so that no
# cancelation method can signal the action. Protocol on stdout, one JSON object per line:
# {"pid": <action pid>} once the action runs, {"after_cancel": [...states...]} three seconds
# after cancel_action(), then, once the test killed the action from outside and wrote a
# line to stdin, {"final": <state>, "errors": [...]}.
UNSIGNALLABLE_HARNESS = """
import ctypes, json, logging, os, pathlib, sys, threading, time
from openjd.model.v2023_09 import ModelParsingContext, StepScript
from openjd.sessions import LOG, Session

def forbid_kill():
    libc = ctypes.CDLL(None, use_errno=True)
    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]
    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]
    audit_arch_x86_64, nr_kill, errno_eperm, allow = 0xC000003E, 62, 0x00050001, 0x7FFF0000
    program = (SockFilter * 6)(
        SockFilter(0x20, 0, 0, 4),                      # load the architecture
        SockFilter(0x15, 0, 3, audit_arch_x86_64),      # other architecture: allow
        SockFilter(0x20, 0, 0, 0),                      # load the system call number
        SockFilter(0x15, 0, 1, nr_kill),                # not kill(): allow
        SockFilter(0x06, 0, 0, errno_eperm),            # kill(): fail with EPERM
        SockFilter(0x06, 0, 0, allow),
    )
    fprog = SockFprog(len(program), program)
    if libc.prctl(38, 1, 0, 0, 0) != 0:                 # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP) failed")

class Errors(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []
    def emit(self, record):
        if record.levelno >= logging.WARNING:
            self.messages.append(record.getMessage())

def report(**values):
    print(json.dumps(values), flush=True)

root, script = sys.argv[1], sys.argv[2]
errors = Errors()
LOG.addHandler(errors)
states = []
done = threading.Event()
def callback(session_id, status):
    states.append(status.state.value)
    if status.state.value != "running":
        done.set()

forbid_kill()
context = ModelParsingContext(supported_extensions=[])
task = StepScript.model_validate(
    {"actions": {"onRun": {"command": sys.executable, "args": [script, root]}}}, context=context
)
arguments = {"session_root_directory": pathlib.Path(root), "callback": callback}
with Session(session_id="unsignallable", job_parameter_values={}, **arguments) as session:
    session.run_task(step_script=task, task_parameter_values={})
    while not os.path.exists(os.path.join(root, "pid")):
        time.sleep(0.01)
    pid = int(open(os.path.join(root, "pid")).read())
    report(pid=pid)
    session.cancel_action()
    done.wait(3)
    report(after_cancel=list(states), errors=list(errors.messages))
    sys.stdin.readline()
    done.wait(60)
    report(final=states[-1], errors=list(errors.messages))
"""

SLEEP_WITH_PID = """
import os, sys, time
with open(os.path.join(sys.argv[1], "pid.tmp"), "w") as file:
    file.write(str(os.getpid()))
os.rename(os.path.join(sys.argv[1], "pid.tmp"), os.path.join(sys.argv[1], "pid"))
time.sleep(300)
"""


class UnsignallableResult(NamedTuple):
    pid: int
    """The pid of the action's process."""
    running_after_cancel: bool
    states_after_cancel: list[str]
    """The states the callback received in the three seconds after cancel_action()."""
    errors_after_cancel: list[str]
    """Messages of WARNING and ERROR records logged by then."""
    final_state: str
    """The terminal state, after the test killed the process from outside."""


SECCOMP_X86_64 = pytest.mark.skipif(platform.machine() != "x86_64", reason="the seccomp filter is written for x86_64")


def run_unsignallable_session(
    tmp_path: Path, kill_leftovers: list[int], path: Optional[str] = None
) -> UnsignallableResult:
    """Cancel an action in UNSIGNALLABLE_HARNESS, then kill the action from outside.

    ``path`` replaces ``PATH`` for the harness process and its session.
    """
    harness = write_child(tmp_path, "harness.py", UNSIGNALLABLE_HARNESS)
    sleeper = write_child(tmp_path, "sleep_with_pid.py", SLEEP_WITH_PID)
    root = tmp_path / "root"
    root.mkdir()
    environment_vars = {**os.environ, TRACKING_ENV_VAR: "process-group"}
    if path is not None:
        environment_vars["PATH"] = path
    with subprocess.Popen(
        [sys.executable, str(harness), str(root), str(sleeper)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=environment_vars,
    ) as harness_process:
        stdin, stdout = harness_process.stdin, harness_process.stdout
        assert stdin is not None and stdout is not None
        reports: queue.Queue[str] = queue.Queue()

        def read_reports() -> None:
            for line in stdout:
                reports.put(line)

        threading.Thread(target=read_reports, daemon=True).start()

        def next_report() -> dict[str, Any]:
            try:
                line = reports.get(timeout=HANG_GUARD)
            except queue.Empty:
                pytest.fail("the harness reported nothing; its error output is shown above")
            result: dict[str, Any] = json.loads(line)
            return result

        try:
            pid = next_report()["pid"]
            kill_leftovers.append(pid)
            after_cancel = next_report()
            running = runs_on(pid)
            os.kill(pid, signal.SIGKILL)
            stdin.write("killed\n")
            stdin.flush()
            final = next_report()
        finally:
            harness_process.kill()
    return UnsignallableResult(pid, running, after_cancel["after_cancel"], after_cancel["errors"], final["final"])


def make_fake_helpers(directory: Path) -> tuple[Path, Path]:
    """Create scripts named like helper programs that only append their use to a log.

    Returns the directory of the scripts and the path of the log, which exists only once a
    script ran.
    """
    fake_bin = directory / "fake bin"
    fake_bin.mkdir()
    used = directory / "helpers-used.log"
    for name in FAKE_HELPERS:
        helper = fake_bin / name
        helper.write_text(f'#!/bin/sh\necho "{name} $*" >> "{used}"\nexit 0\n')
        helper.chmod(0o755)
    return fake_bin, used


def test_cancel_ignores_fake_helpers_on_path(
    new_session: SessionFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tracking: str,
    kill_leftovers: list[int],
) -> None:
    fake_bin, used = make_fake_helpers(tmp_path)
    fake_path = f"{fake_bin}{os.pathsep}{os.environ.get('PATH', '')}"
    monkeypatch.setenv("PATH", fake_path)
    tree = write_child(tmp_path, "tree.py", PROCESS_TREE)
    notify = write_child(tmp_path, "notify.py", NOTIFY_CHILD)
    directories = {name: tmp_path / name for name in ("terminate", "notify", "timeout", "leftover")}
    for directory in directories.values():
        directory.mkdir()
    sessions = {name: new_session(os_env_vars={"PATH": fake_path}) for name in directories}

    session, recorder = sessions["terminate"]
    since = recorder.mark()
    start_task(session, step_script(python_action(tree, str(directories["terminate"]))))
    wait_for((directories["terminate"] / "ready").exists, "the process tree")
    kill_leftovers.extend(read_pids(directories["terminate"]).values())
    session.cancel_action()
    canceled = recorder.wait_final(since)

    session, recorder = sessions["notify"]
    notify_action = python_action(
        notify,
        str(directories["notify"]),
        "ignore",
        cancelation={"mode": "NOTIFY_THEN_TERMINATE", "notifyPeriodInSeconds": 1},
    )
    since = recorder.mark()
    start_task(session, step_script(notify_action))
    wait_for((directories["notify"] / "ready").exists, "the notify child")
    session.cancel_action()
    notified = recorder.wait_final(since)

    session, recorder = sessions["timeout"]
    timeout_task = step_script(python_action(tree, str(directories["timeout"]), timeout=1))
    timed_out = run_task_and_wait(session, recorder, timeout_task)
    kill_leftovers.extend(read_pids(directories["timeout"]).values())

    session, recorder = sessions["leftover"]
    env = environment("Daemon", on_enter=python_action(tree, str(directories["leftover"]), "exit-detached"))
    entered = run_and_wait(recorder, lambda: session.enter_environment(environment=env))
    kill_leftovers.extend(read_pids(directories["leftover"]).values())
    for session, _ in sessions.values():
        session.cleanup()

    assert canceled.state == ActionState.CANCELED
    assert notified.state == ActionState.CANCELED
    assert timed_out.state == ActionState.TIMEOUT
    assert entered.state == ActionState.SUCCESS
    assert not used.exists(), used.read_text()
    # Descendants are the subject of the process-tree tests below.
    for name in ("terminate", "timeout"):
        pid = read_pids(directories[name])["main"]
        wait_for(process_ended(pid), f"the main process {pid} of {name} to end", timeout=10)
    for session, _ in sessions.values():
        assert not session.working_directory.exists()


@SECCOMP_X86_64
def test_failed_kill_skips_path_helpers(tmp_path: Path, kill_leftovers: list[int]) -> None:
    fake_bin, used = make_fake_helpers(tmp_path)

    result = run_unsignallable_session(tmp_path, kill_leftovers, f"{fake_bin}{os.pathsep}{os.environ['PATH']}")

    assert result.running_after_cancel
    assert result.final_state == "canceled"
    assert not used.exists(), used.read_text()


# ----- 7. output is never lost and never hangs -----------------------------------------------

WRITE_BYTES = """
import sys
sys.stdout.buffer.write(bytes.fromhex(sys.argv[1]))
sys.stdout.buffer.flush()
"""


def test_invalid_utf8_output_replaced_and_drained(
    new_session: SessionFactory, tmp_path: Path, log_store: RecordStore
) -> None:
    session, recorder = new_session()
    writer = write_child(tmp_path, "write_bytes.py", WRITE_BYTES)
    data = b"before\nbad \xff\xfe bytes\ncut \xe2\x82 here\n" + b"openjd_progress: 50\n" + b"after\n" * 1000
    task = step_script(python_action(writer, data.hex()))

    final = run_task_and_wait(session, recorder, task)

    assert final.state == ActionState.SUCCESS
    assert final.progress == 50.0
    output = log_store.output(recorder.session_id)
    assert output[:4] == ["before", "bad \ufffd\ufffd bytes", "cut \ufffd here", "openjd_progress: 50"]
    assert output[4:] == ["after"] * 1000


def test_long_line_delivered_in_pieces(new_session: SessionFactory, tmp_path: Path, log_store: RecordStore) -> None:
    session, recorder = new_session()
    writer = write_child(
        tmp_path,
        "long_line.py",
        """
        import sys
        line = "".join(f"{index:07d}," for index in range(25_001))
        sys.stdout.write("head\\n" + line + "\\ntail\\n")
        """,
    )
    expected = "".join(f"{index:07d}," for index in range(25_001))

    final = run_task_and_wait(session, recorder, step_script(python_action(writer)))

    assert final.state == ActionState.SUCCESS
    output = log_store.output(recorder.session_id)
    assert output[0] == "head"
    assert output[-1] == "tail"
    pieces = output[1:-1]
    assert len(pieces) == -(-len(expected) // LINE_LIMIT)
    assert all(len(piece) <= LINE_LIMIT for piece in pieces)
    assert "".join(pieces) == expected


@pytest.mark.parametrize("kind", ["env", "redacted_env"])
def test_long_env_value_applied_whole(new_session: SessionFactory, tmp_path: Path, kind: str) -> None:
    session, recorder = new_session(revision_extensions=REDACTION)
    value = "".join(f"{index:05d}" for index in range(20_000))
    writer = write_child(
        tmp_path,
        "long_env.py",
        f"""
        import sys
        value = "".join(f"{{index:05d}}" for index in range(20_000))
        print("openjd_{kind}: BIG=" + value, flush=True)
        """,
    )
    dump = write_child(tmp_path, "dump.py", DUMP_PROCESS)
    env = environment("Big", on_enter=python_action(writer))
    task = step_script(python_action(dump, str(tmp_path / "dump.json")))

    entered = run_and_wait(recorder, lambda: session.enter_environment(environment=env))
    task_status = run_task_and_wait(session, recorder, task)

    assert len(value) == 100_000
    assert entered.state == ActionState.SUCCESS
    assert task_status.state == ActionState.SUCCESS
    seen = json.loads((tmp_path / "dump.json").read_text())["env"]["BIG"]
    assert len(seen) == len(value)
    assert seen == value


@pytest.mark.parametrize(
    ("kind", "length"),
    [("env", 200_000), ("env", 1_100_000), ("redacted_env", 1_100_000), ("env", 5_000_000)],
)
def test_oversized_env_value_fails_action(
    new_session: SessionFactory, tmp_path: Path, log_store: RecordStore, kind: str, length: int
) -> None:
    session, recorder = new_session(revision_extensions=REDACTION)
    writer = write_child(
        tmp_path,
        "huge_env.py",
        f"""
        import sys, time
        value = ("0123456789abcdef" * ({length} // 16 + 1))[:{length}]
        sys.stdout.write("openjd_{kind}: HUGE=" + value + "\\n")
        sys.stdout.flush()
        time.sleep(300)
        """,
    )
    env = environment("Huge", on_enter=python_action(writer))

    entered = run_and_wait(recorder, lambda: session.enter_environment(environment=env, identifier="huge"))

    # Each value is too long to apply: over 1 MiB for one output line, or (200,000) over the
    # 128 KiB that Linux accepts for one variable. The sleep makes the failure need a cancel.
    assert entered.state == ActionState.FAILED
    assert entered.fail_message
    assert f"openjd_{kind}" in entered.fail_message or "HUGE" in entered.fail_message
    assert session.state == SessionState.READY_ENDING
    assert session.environments_entered == ("huge",)
    assert any(entered.fail_message in message for message in log_store.messages(recorder.session_id))


def test_huge_line_without_newline_delivered(
    new_session: SessionFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = 100 * 1024 * 1024
    pattern = "0123456789abcdef"
    writer = write_child(
        tmp_path,
        "huge_line.py",
        f"""
        import sys
        chunk = ({pattern!r} * 65536).encode()
        for _ in range({size} // len(chunk)):
            sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        """,
    )
    # Count and check the pieces as they arrive instead of keeping 100 MiB of records.
    reference = pattern * (LINE_LIMIT // len(pattern) + 2)
    received = {"chars": 0, "pieces": 0, "bad": 0, "longest": 0}

    class PieceChecker(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if getattr(record, "session_id", None) != "huge-line":
                return
            if getattr(record, "openjd_log_content", None) != LogContent.COMMAND_OUTPUT:
                return
            piece = record.getMessage()
            offset = received["chars"] % len(pattern)
            if piece != reference[offset : offset + len(piece)]:
                received["bad"] += 1
            received["chars"] += len(piece)
            received["pieces"] += 1
            received["longest"] = max(received["longest"], len(piece))

    monkeypatch.setattr(LOG, "propagate", False)
    checker = PieceChecker()
    LOG.addHandler(checker)
    try:
        session, recorder = new_session(session_id="huge-line")
        final = run_task_and_wait(session, recorder, step_script(python_action(writer)), timeout=600)
    finally:
        LOG.removeHandler(checker)

    assert final.state == ActionState.SUCCESS
    assert received["bad"] == 0
    assert received["chars"] == size
    assert received["longest"] == LINE_LIMIT
    assert received["pieces"] == -(-size // LINE_LIMIT)


# ----- 8. the protocol does not depend on logging -------------------------------------------


def test_messages_work_with_logger_at_warning(
    new_session: SessionFactory, tmp_path: Path, restore_log_level: None
) -> None:
    LOG.setLevel(logging.WARNING)
    session, recorder = new_session(revision_extensions=REDACTION)
    printer = write_child(tmp_path, "print_args.py", PRINT_ARGS)
    dump = write_child(tmp_path, "dump.py", DUMP_PROCESS)
    env = environment(
        "Quiet",
        on_enter=python_action(
            printer, "openjd_env: SEEN=yes", "openjd_redacted_env: HIDDEN=s3cr3t", "openjd_unset_env: HOME"
        ),
    )
    task = step_script(
        python_action(printer, "openjd_progress: 42", "openjd_status: half way", "openjd_fail: not really")
    )

    entered = run_and_wait(recorder, lambda: session.enter_environment(environment=env))
    since = recorder.mark()
    task_status = run_task_and_wait(session, recorder, task)
    dumped = run_task_and_wait(session, recorder, step_script(python_action(dump, str(tmp_path / "dump.json"))))

    assert entered.state == ActionState.SUCCESS
    assert task_status.state == ActionState.SUCCESS
    assert task_status.progress == 42.0
    assert task_status.status_message == "half way"
    assert task_status.fail_message == "not really"
    updates = [status for status in recorder.statuses[since:] if status.state == ActionState.RUNNING]
    assert [status.progress for status in updates if status.progress is not None][:1] == [42.0]
    assert dumped.state == ActionState.SUCCESS
    seen = json.loads((tmp_path / "dump.json").read_text())["env"]
    assert seen["SEEN"] == "yes"
    assert seen["HIDDEN"] == "s3cr3t"
    assert "HOME" not in seen
    assert LOG.level == logging.WARNING


@pytest.mark.parametrize("level", ["ERROR", "WARNING", "DEBUG"])
def test_runtime_loglevel_affects_only_own_session(
    new_session: SessionFactory, tmp_path: Path, log_store: RecordStore, restore_log_level: None, level: str
) -> None:
    changer, changer_recorder = new_session(session_id="changer")
    bystander, bystander_recorder = new_session(session_id="bystander")
    printer = write_child(tmp_path, "print_args.py", PRINT_ARGS)
    change = step_script(
        python_action(printer, "changer before", f"openjd_session_runtime_loglevel: {level}", "changer after")
    )
    plain = step_script(python_action(printer, "bystander line"))
    level_before = LOG.level

    changed = run_task_and_wait(changer, changer_recorder, change)
    plain_status = run_task_and_wait(bystander, bystander_recorder, plain)
    LOG.info("host line", extra={"session_id": "changer"})

    assert changed.state == ActionState.SUCCESS
    assert plain_status.state == ActionState.SUCCESS
    assert LOG.level == level_before == logging.INFO
    assert "changer before" in log_store.output("changer")
    assert "bystander line" in log_store.output("bystander")
    assert "host line" in log_store.messages("changer")
    bystander_levels = {r.levelno for r in log_store.records if getattr(r, "session_id", None) == "bystander"}
    assert logging.DEBUG not in bystander_levels
    if level in ("ERROR", "WARNING"):
        assert "changer after" not in log_store.output("changer")
    else:
        assert "changer after" in log_store.output("changer")


# ----- 9. malformed environment messages fail the action -------------------------------------


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        ("openjd_env: 1FOO=bar", "openjd_env"),
        ("openjd_env: NO_EQUALS", "openjd_env"),
        ('openjd_env: "FOO=unterminated', "openjd_env"),
        ('openjd_env: "FOO=x" trailing', "openjd_env"),
        ('openjd_env: "FOO=\\q"', "openjd_env"),
        ("openjd_redacted_env: NO_EQUALS", "openjd_redacted_env"),
        ("openjd_redacted_env: 1BAD=x", "openjd_redacted_env"),
        ('openjd_redacted_env: "FOO=abc', "openjd_redacted_env"),
        ("openjd_unset_env: TWO WORDS", "openjd_unset_env"),
        ("openjd_unset_env: TRAILING ", "openjd_unset_env"),
        ("openjd_env:NO_SPACE=1", "openjd_env"),
        ("OPENJD_ENV: UPPER=1", "openjd_env"),
    ],
)
def test_malformed_env_message_fails_environment(
    new_session: SessionFactory, tmp_path: Path, line: str, kind: str
) -> None:
    session, recorder = new_session(revision_extensions=REDACTION)
    sleeper = write_child(tmp_path, "print_then_sleep.py", PRINT_THEN_SLEEP)
    dump = write_child(tmp_path, "dump.py", DUMP_PROCESS)
    env = environment(
        "Broken",
        on_enter=python_action(sleeper, str(tmp_path / "ready"), "openjd_env: BEFORE=1", line),
        on_exit=python_action(dump, str(tmp_path / "exit.json")),
    )

    entered = run_and_wait(recorder, lambda: session.enter_environment(environment=env, identifier="broken"))
    exited = run_and_wait(recorder, lambda: session.exit_environment(identifier="broken"))

    assert entered.state == ActionState.FAILED
    assert entered.fail_message is not None
    assert kind in entered.fail_message
    assert exited.state == ActionState.SUCCESS
    seen = json.loads((tmp_path / "exit.json").read_text())["env"]
    assert seen["BEFORE"] == "1"
    for name in ("FOO", "NO_EQUALS", "BAD", "TWO", "TRAILING", "NO_SPACE", "UPPER"):
        assert name not in seen


def test_env_like_prose_is_ordinary_output(new_session: SessionFactory, tmp_path: Path, log_store: RecordStore) -> None:
    session, recorder = new_session()
    printer = write_child(tmp_path, "print_args.py", PRINT_ARGS)
    prose = ["openjd_environment is ready", "openjd_envelope: sealed", "openjd_unset_environment done"]
    env = environment("Prose", on_enter=python_action(printer, *prose))

    entered = run_and_wait(recorder, lambda: session.enter_environment(environment=env))

    assert entered.state == ActionState.SUCCESS
    assert entered.fail_message is None
    assert log_store.output(recorder.session_id) == prose


def test_env_messages_in_task_only_warn(new_session: SessionFactory, tmp_path: Path, log_store: RecordStore) -> None:
    session, recorder = new_session(revision_extensions=REDACTION)
    printer = write_child(tmp_path, "print_args.py", PRINT_ARGS)
    dump = write_child(tmp_path, "dump.py", DUMP_PROCESS)
    lines = [
        "openjd_env: TASK_VAR=1",
        "openjd_redacted_env: TASK_SECRET=2",
        "openjd_unset_env: HOME",
        "openjd_env: 1BAD=x",
        "openjd_unset_env: TWO WORDS",
        "openjd_status: still running",
    ]
    task = step_script(python_action(printer, *lines))

    final = run_task_and_wait(session, recorder, task)
    dumped = run_task_and_wait(session, recorder, step_script(python_action(dump, str(tmp_path / "dump.json"))))

    assert final.state == ActionState.SUCCESS
    assert final.exit_code == 0
    assert final.status_message == "still running"
    assert final.fail_message is None
    warnings = [
        r.getMessage()
        for r in log_store.records
        if r.levelno == logging.WARNING and getattr(r, "session_id", None) == recorder.session_id
    ]
    assert len(warnings) >= 5
    assert dumped.state == ActionState.SUCCESS
    seen = json.loads((tmp_path / "dump.json").read_text())["env"]
    assert "TASK_VAR" not in seen
    assert "TASK_SECRET" not in seen
    assert seen["HOME"] == os.environ["HOME"]


# ----- 10. no stuck session -----------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        "unresolved_argument",
        "missing_absolute_command",
        "command_not_on_path",
        "non_numeric_timeout",
        "zero_timeout",
        "non_numeric_notify_period",
        "working_directory_removed",
        "working_directory_replaced_by_file",
    ],
)
def test_prelaunch_error_ends_action_failed(
    new_session: SessionFactory, tmp_path: Path, log_store: RecordStore, case: str
) -> None:
    parameters = string_parameters(Text="abc", Zero="0")
    session, recorder = new_session(job_parameter_values=parameters)
    printer = write_child(tmp_path, "print_args.py", PRINT_ARGS)
    action = python_action(printer, "should not run")
    files: Optional[list[dict[str, Any]]] = None
    if case == "unresolved_argument":
        action["args"].append("{{Param.Missing}}")
    elif case == "missing_absolute_command":
        action["command"] = str(tmp_path / "no-such-dir" / "no-such-command")
    elif case == "command_not_on_path":
        action["command"] = "openjd-test-no-such-command"
    elif case == "non_numeric_timeout":
        action["timeout"] = "{{Param.Text}}"
    elif case == "zero_timeout":
        action["timeout"] = "{{Param.Zero}}"
    elif case == "non_numeric_notify_period":
        action["cancelation"] = {"mode": "NOTIFY_THEN_TERMINATE", "notifyPeriodInSeconds": "{{Param.Text}}"}
    elif case == "working_directory_removed":
        shutil.rmtree(session.working_directory)
    else:
        shutil.rmtree(session.working_directory)
        session.working_directory.write_text("not a directory")
        files = [{"name": "Data", "type": "TEXT", "data": "x"}]
    task = step_script(action, files)

    final = run_task_and_wait(session, recorder, task)

    assert final.state == ActionState.FAILED
    assert session.state == SessionState.READY_ENDING
    assert "should not run" not in log_store.output(recorder.session_id)
    culprit = {
        "unresolved_argument": "Param.Missing",
        "missing_absolute_command": "no-such-command",
        "command_not_on_path": "openjd-test-no-such-command",
        "non_numeric_timeout": "timeout",
        "zero_timeout": "timeout",
        "non_numeric_notify_period": "notifyPeriodInSeconds",
        "working_directory_removed": str(session.working_directory),
        "working_directory_replaced_by_file": str(session.working_directory),
    }[case]
    reasons = [
        message
        for message in log_store.messages(recorder.session_id)
        if culprit in message and not message.startswith(("Running command", "Session", "Deleting", "Mapping:"))
    ]
    assert reasons != []
    with pytest.raises(RuntimeError):
        session.cancel_action()


def test_environment_variable_error_leaves_clean_stack(
    new_session: SessionFactory, tmp_path: Path, log_store: RecordStore
) -> None:
    session, recorder = new_session()
    printer = write_child(tmp_path, "print_args.py", PRINT_ARGS)
    broken = environment(
        "Broken",
        variables={"FINE": "1", "BROKEN": "{{Param.Missing}}"},
        on_enter=python_action(printer, "enter should not run"),
        on_exit=python_action(printer, "exit ran"),
    )

    entered = run_and_wait(recorder, lambda: session.enter_environment(environment=broken, identifier="broken"))
    state_after_enter = session.state
    stack_after_enter = session.environments_entered
    exited = run_and_wait(recorder, lambda: session.exit_environment(identifier="broken"))

    assert entered.state == ActionState.FAILED
    assert entered.fail_message is not None
    assert "Param.Missing" in entered.fail_message
    assert state_after_enter == SessionState.READY_ENDING
    assert stack_after_enter == ("broken",)
    assert exited.state == ActionState.SUCCESS
    assert session.environments_entered == ()
    assert session.state == SessionState.READY_ENDING
    output = log_store.output(recorder.session_id)
    assert "enter should not run" not in output
    assert "exit ran" in output


def test_format_string_limits_resolved_from_symbols(
    new_session: SessionFactory, tmp_path: Path, log_store: RecordStore
) -> None:
    session, recorder = new_session(job_parameter_values=string_parameters(Limit="1", Period="1"))
    notify = write_child(tmp_path, "notify.py", NOTIFY_CHILD)
    action = python_action(
        notify,
        str(tmp_path),
        "record",
        timeout="{{Param.Limit}}",
        cancelation={"mode": "NOTIFY_THEN_TERMINATE", "notifyPeriodInSeconds": "{{Param.Period}}"},
    )

    # With the limits unresolved, the defaults would be no runtime limit and a notify
    # period of 120 seconds, and the hang guard would end the test.
    final = run_task_and_wait(session, recorder, step_script(action), timeout=30)

    assert final.state == ActionState.TIMEOUT
    assert (tmp_path / "got_sigterm").exists()
    messages = log_store.messages(recorder.session_id)
    assert any(message.startswith("TIMEOUT - Runtime limit reached") for message in messages)
    assert any(message.startswith("Notify period ended") for message in messages)


# ----- 11. run_subprocess takes its arguments literally -------------------------------------


def test_run_subprocess_passes_arguments_literally(new_session: SessionFactory, tmp_path: Path) -> None:
    session, recorder = new_session()
    dump = write_child(tmp_path, "dump {{Task.File.X}}.py", DUMP_PROCESS)
    dump_file = tmp_path / "dump.json"
    literal_args = [
        "{{Session.WorkingDirectory}}",
        "{{",
        "}}",
        "{{ Param.X }}",
        "line one\nline two",
        "tab\there",
        "carriage\rreturn",
        "%s %% %(name)s",
        "$HOME",
        "",
        " ",
        "\x1b[31mred\x1b[0m",
    ]

    final = run_and_wait(
        recorder,
        lambda: session.run_subprocess(command=sys.executable, args=[str(dump), str(dump_file), *literal_args]),
    )

    assert final.state == ActionState.SUCCESS
    assert json.loads(dump_file.read_text(encoding="utf-8"))["argv"] == literal_args


def test_run_subprocess_command_taken_literally(
    new_session: SessionFactory, tmp_path: Path, log_store: RecordStore
) -> None:
    session, recorder = new_session()
    command = tmp_path / "run {{Param.X}} }}.sh"
    command.write_text('#!/bin/sh\necho "ran $1"\n')
    command.chmod(0o755)

    final = run_and_wait(recorder, lambda: session.run_subprocess(command=str(command), args=["{{x}}"]))

    assert final.state == ActionState.SUCCESS
    assert log_store.output(recorder.session_id) == ["ran {{x}}"]


# ----- 12. values are passed exactly --------------------------------------------------------

EXACT_VALUES = {
    "V_CRLF": "first\r\nsecond\r\n",
    "V_CR": "a\rb",
    "V_LF": "line1\nline2\n",
    "V_QUOTES": "'single' \"double\" `back`",
    "V_DOLLAR": "$HOME ${PATH} $(id) $$",
    "V_BACKSLASH": "a\\nb\\",
    "V_UNICODE": "\u00fc\u20ac\U0001f600",
    "V_SPACES": "  lead and trail  ",
    "V_EMPTY": "",
    "V_PERCENT": "100% %s %%",
}


def test_env_values_reach_process_exactly(new_session: SessionFactory, tmp_path: Path) -> None:
    session, recorder = new_session(os_env_vars={f"S_{name}": value for name, value in EXACT_VALUES.items()})
    writer = write_child(
        tmp_path,
        "json_env.py",
        """
        import json, sys
        values = json.loads(bytes.fromhex(sys.argv[1]).decode())
        for name, value in values.items():
            print("openjd_env: " + json.dumps(f"M_{name}={value}"), flush=True)
        """,
    )
    dump = write_child(tmp_path, "dump.py", DUMP_PROCESS)
    env = environment("Exact", on_enter=python_action(writer, json.dumps(EXACT_VALUES).encode().hex()))
    call_vars = {f"C_{name}": value for name, value in EXACT_VALUES.items()}

    entered = run_and_wait(recorder, lambda: session.enter_environment(environment=env))
    dump_task = step_script(python_action(dump, str(tmp_path / "task.json")))
    task_status = run_task_and_wait(session, recorder, dump_task, os_env_vars=call_vars)

    assert entered.state == ActionState.SUCCESS
    assert task_status.state == ActionState.SUCCESS
    seen = json.loads((tmp_path / "task.json").read_text(encoding="utf-8"))["env"]
    for prefix in ("S_", "C_", "M_"):
        for name, value in EXACT_VALUES.items():
            assert seen[prefix + name] == value, prefix + name


@pytest.mark.parametrize("with_secret", [False, True])
def test_percent_in_output_logged_verbatim(
    new_session: SessionFactory, tmp_path: Path, log_store: RecordStore, with_secret: bool
) -> None:
    session, recorder = new_session(revision_extensions=REDACTION)
    printer = write_child(tmp_path, "print_args.py", PRINT_ARGS)
    hex_printer = write_child(tmp_path, "print_hex_args.py", PRINT_HEX_ARGS)
    lines = ["100%", "%s", "%%", "%(name)s", "50% done %d", "%", "a %% b %s"]
    if with_secret:
        env = environment("Secret", on_enter=python_action(hex_printer, *hex_args("openjd_redacted_env: K=zq9x")))
        run_and_wait(recorder, lambda: session.enter_environment(environment=env))
    task = step_script(python_action(printer, *lines))

    final = run_task_and_wait(session, recorder, task)

    assert final.state == ActionState.SUCCESS
    assert log_store.output(recorder.session_id)[-len(lines) :] == lines
    warnings = [r for r in log_store.records if r.levelno >= logging.WARNING]
    assert warnings == []


# ----- 13. a zero time limit terminates at once ---------------------------------------------


@pytest.mark.parametrize(("time_limit", "expect_notify"), [(timedelta(0), False), (timedelta(seconds=1), True)])
def test_zero_time_limit_skips_notify_signal(
    new_session: SessionFactory,
    tmp_path: Path,
    log_store: RecordStore,
    time_limit: timedelta,
    expect_notify: bool,
) -> None:
    session, recorder = new_session()
    notify = write_child(tmp_path, "notify.py", NOTIFY_CHILD)
    action = python_action(
        notify, str(tmp_path), "record", cancelation={"mode": "NOTIFY_THEN_TERMINATE", "notifyPeriodInSeconds": 30}
    )
    since = recorder.mark()
    start_task(session, step_script(action))
    wait_for((tmp_path / "ready").exists, "the child to install its SIGTERM handler")

    session.cancel_action(time_limit=time_limit)
    final = recorder.wait_final(since)

    assert final.state == ActionState.CANCELED
    assert final.exit_code == -signal.SIGKILL
    messages = log_store.messages(recorder.session_id)
    term_sent = [message for message in messages if 'Sending signal "term"' in message]
    if expect_notify:
        # The control case: the handler works and records a notify signal.
        assert len(term_sent) == 1
        assert (tmp_path / "got_sigterm").exists()
    else:
        assert term_sent == []
        assert not (tmp_path / "got_sigterm").exists()
        assert not (session.working_directory / "cancel_info.json").exists()


# ----- 14. a cancel always kills, or reports why it could not -------------------------------


@pytest.mark.parametrize("how", ["terminate", "notify_then_terminate", "timeout", "mark_failed"])
def test_cancel_reported_after_tree_ends(
    new_session: SessionFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kill_leftovers: list[int],
    how: str,
) -> None:
    # cgroup tracking finds every descendant; the process-group limits are tested below.
    use_tracking("cgroup", monkeypatch, tmp_path)
    running_at_final: dict[str, int] = {}
    pids: dict[str, int] = {}

    def check_tree(session_id: str, status: ActionStatus) -> None:
        if status.state in TERMINAL_STATES:
            running_at_final.update((name, pid) for name, pid in pids.items() if runs_on(pid))
        recorder(session_id, status)

    recorder = Recorder()
    session, _ = new_session(callback=check_tree)
    tree = write_child(tmp_path, "tree.py", PROCESS_TREE)
    fields: dict[str, Any] = {}
    if how == "notify_then_terminate":
        fields["cancelation"] = {"mode": "NOTIFY_THEN_TERMINATE", "notifyPeriodInSeconds": 1}
    if how == "timeout":
        fields["timeout"] = 2
    since = recorder.mark()
    start_task(session, step_script(python_action(tree, str(tmp_path), **fields)))
    wait_for((tmp_path / "ready").exists, "the process tree")
    pids.update(read_pids(tmp_path))
    kill_leftovers.extend(pids.values())

    if how != "timeout":
        session.cancel_action(mark_action_failed=how == "mark_failed")
    final = recorder.wait_final(since)

    expected = {
        "terminate": ActionState.CANCELED,
        "notify_then_terminate": ActionState.CANCELED,
        "timeout": ActionState.TIMEOUT,
        "mark_failed": ActionState.FAILED,
    }
    assert final.state == expected[how]
    assert final.exit_code == -signal.SIGKILL
    assert running_processes(running_at_final) == []


@SECCOMP_X86_64
def test_unsignallable_action_logged_not_canceled(tmp_path: Path, kill_leftovers: list[int]) -> None:
    result = run_unsignallable_session(tmp_path, kill_leftovers)

    assert result.running_after_cancel
    assert result.states_after_cancel == ["running"]
    assert any(str(result.pid) in message for message in result.errors_after_cancel)
    assert result.final_state == "canceled"


# ----- 15. the whole process tree ends ------------------------------------------------------


class OrphanSurvivedError(AssertionError):
    """A setsid() descendant whose parent had exited outlived the action."""


ORPHAN_MISSED = pytest.mark.xfail(
    strict=True,
    raises=OrphanSurvivedError,
    reason="process-group tracking cannot find a setsid() descendant whose parent already exited",
)
CANCEL_METHODS = ["terminate", "timeout", "notify_then_terminate", "notify_time_limit"]


def cancel_process_tree(
    new_session: SessionFactory, directory: Path, kill_leftovers: list[int], how: str
) -> dict[str, int]:
    """Run PROCESS_TREE as a task, end it the way ``how`` names, and return its pids."""
    directory.mkdir(exist_ok=True)
    session, recorder = new_session()
    tree = write_child(directory, "tree.py", PROCESS_TREE)
    fields: dict[str, Any] = {}
    if how == "timeout":
        fields["timeout"] = 2
    elif how.startswith("notify"):
        period = 1 if how == "notify_then_terminate" else 60
        fields["cancelation"] = {"mode": "NOTIFY_THEN_TERMINATE", "notifyPeriodInSeconds": period}
    since = recorder.mark()
    start_task(session, step_script(python_action(tree, str(directory), **fields)))
    wait_for((directory / "ready").exists, "the process tree")
    pids = read_pids(directory)
    kill_leftovers.extend(pids.values())

    if how == "notify_time_limit":
        session.cancel_action(time_limit=timedelta(seconds=1))
    elif how != "timeout":
        session.cancel_action()
    final = recorder.wait_final(since)
    assert final.state == (ActionState.TIMEOUT if how == "timeout" else ActionState.CANCELED)
    assert set(pids) == {"main", "kept", "group", "orphan"}
    return pids


@pytest.mark.parametrize("how", CANCEL_METHODS)
def test_cancel_kills_setsid_descendants(
    new_session: SessionFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kill_leftovers: list[int],
    how: str,
) -> None:
    use_tracking("cgroup", monkeypatch, tmp_path)

    pids = cancel_process_tree(new_session, tmp_path, kill_leftovers, how)

    assert running_processes(pids) == []


def test_group_tracking_kills_setsid_child(
    new_session: SessionFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kill_leftovers: list[int]
) -> None:
    use_tracking("process-group", monkeypatch, tmp_path)

    for round_number in range(8):
        pids = cancel_process_tree(new_session, tmp_path / f"round{round_number}", kill_leftovers, "terminate")

        assert running_processes({name: pids[name] for name in ("main", "group", "kept")}) == []


@pytest.mark.parametrize("how", CANCEL_METHODS)
@pytest.mark.parametrize("mechanism", ["cgroup", pytest.param("process-group", marks=ORPHAN_MISSED)])
def test_cancel_kills_orphaned_setsid_grandchild(
    new_session: SessionFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kill_leftovers: list[int],
    mechanism: str,
    how: str,
) -> None:
    use_tracking(mechanism, monkeypatch, tmp_path)

    pids = cancel_process_tree(new_session, tmp_path, kill_leftovers, how)

    if running_processes({"orphan": pids["orphan"]}):
        raise OrphanSurvivedError(f"the orphaned setsid() grandchild {pids['orphan']} still runs")


@pytest.mark.parametrize("mechanism", ["cgroup", pytest.param("process-group", marks=ORPHAN_MISSED)])
def test_cancel_in_drain_window_kills_holder(
    new_session: SessionFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    log_store: RecordStore,
    kill_leftovers: list[int],
    mechanism: str,
) -> None:
    use_tracking(mechanism, monkeypatch, tmp_path)
    session, recorder = new_session()
    tree = write_child(tmp_path, "tree.py", PROCESS_TREE)
    since = recorder.mark()
    start_task(session, step_script(python_action(tree, str(tmp_path), "exit-holding")))
    wait_for((tmp_path / "ready").exists, "the process tree")
    pids = read_pids(tmp_path)
    kill_leftovers.extend(pids.values())
    wait_for(process_ended(pids["main"]), "the main process to exit")
    # The orphan keeps the output pipe open, so the action waits for it to close.
    assert session.state == SessionState.RUNNING

    session.cancel_action()
    final = recorder.wait_final(since)

    assert final.state == ActionState.CANCELED
    assert final.exit_code == 0
    assert "tree ready" in log_store.output(recorder.session_id)
    if running_processes({"orphan": pids["orphan"]}):
        raise OrphanSurvivedError(f"the orphaned setsid() grandchild {pids['orphan']} still runs")


# ----- 16. a user cancel wins over a later timeout ------------------------------------------


def test_cancel_during_notify_beats_timeout(
    new_session: SessionFactory, tmp_path: Path, log_store: RecordStore
) -> None:
    session, recorder = new_session()
    notify = write_child(tmp_path, "notify.py", NOTIFY_CHILD)
    # The runtime limit (2 s) expires while the notify period (4 s) of the user's cancel runs.
    action = python_action(
        notify,
        str(tmp_path),
        "record",
        timeout=2,
        cancelation={"mode": "NOTIFY_THEN_TERMINATE", "notifyPeriodInSeconds": 4},
    )
    since = recorder.mark()
    start_task(session, step_script(action))
    wait_for((tmp_path / "ready").exists, "the child to install its SIGTERM handler")

    session.cancel_action()
    final = recorder.wait_final(since)

    assert final.state == ActionState.CANCELED
    assert final.exit_code == -signal.SIGKILL
    assert (tmp_path / "got_sigterm").exists()
    messages = log_store.messages(recorder.session_id)
    canceled_at = next(i for i, m in enumerate(messages) if m.startswith("Canceling subprocess"))
    limit_at = next(i for i, m in enumerate(messages) if m.startswith("TIMEOUT - Runtime limit reached"))
    killed_at = next(i for i, m in enumerate(messages) if m.startswith('INTERRUPT: Sending signal "kill"'))
    assert canceled_at < limit_at < killed_at


# ----- 17. cleanup while an action runs -----------------------------------------------------


@pytest.mark.parametrize("cancelation", ["TERMINATE", "NOTIFY_THEN_TERMINATE"])
def test_cleanup_during_task_terminates_it(
    new_session: SessionFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kill_leftovers: list[int],
    cancelation: str,
) -> None:
    use_tracking("cgroup", monkeypatch, tmp_path)
    session, recorder = new_session()
    tree = write_child(tmp_path, "tree.py", PROCESS_TREE)
    fields: dict[str, Any] = {"cancelation": {"mode": cancelation}}
    if cancelation == "NOTIFY_THEN_TERMINATE":
        fields["cancelation"]["notifyPeriodInSeconds"] = 600
    since = recorder.mark()
    start_task(session, step_script(python_action(tree, str(tmp_path), **fields)))
    wait_for((tmp_path / "ready").exists, "the process tree")
    pids = read_pids(tmp_path)
    kill_leftovers.extend(pids.values())
    working_directory = session.working_directory

    cleaner = threading.Thread(target=session.cleanup, name="cleanup")
    cleaner.start()
    cleaner.join(HANG_GUARD)

    assert not cleaner.is_alive()
    final = recorder.wait_final(since, timeout=1)
    assert final.state == ActionState.CANCELED
    assert session.state == SessionState.ENDED
    assert not working_directory.exists()
    assert running_processes(pids) == []


# ----- 18. PathMappingRule validates its arguments ------------------------------------------


@pytest.mark.parametrize("value", ["POSIX", "posix", "WINDOWS", 1, None, PurePosixPath("/a")])
def test_mapping_rule_rejects_non_enum_format(value: object) -> None:
    with pytest.raises((TypeError, ValueError)) as raised:
        PathMappingRule(
            source_path_format=value,  # type: ignore[arg-type]
            source_path=PurePosixPath("/a"),
            destination_path=PurePosixPath("/b"),
        )

    message = str(raised.value)
    assert repr(value) in message
    assert "PathFormat.POSIX" in message
    assert "PathFormat.WINDOWS" in message


def test_path_mapping_rule_rejects_mismatched_path() -> None:
    with pytest.raises(ValueError, match="source_path"):
        PathMappingRule(
            source_path_format=PathFormat.POSIX,
            source_path=PureWindowsPath("C:\\a"),
            destination_path=PurePosixPath("/b"),
        )
    rule = PathMappingRule(
        source_path_format=PathFormat.WINDOWS,
        source_path=PureWindowsPath("C:\\a"),
        destination_path=PurePosixPath("/b"),
    )
    assert rule.to_dict()["source_path_format"] == "WINDOWS"


# ----- 19. callback order -------------------------------------------------------------------


def test_running_callback_precedes_terminal_state(new_session: SessionFactory, tmp_path: Path) -> None:
    by_action: dict[int, list[ActionStatus]] = {}
    current = {"action": -1}
    active: list[ActionStatus] = []
    overlaps: list[tuple[ActionStatus, ActionStatus]] = []
    guard = threading.Lock()

    def tag(session_id: str, status: ActionStatus) -> None:
        with guard:
            overlaps.extend((running, status) for running in active)
            active.append(status)
        by_action.setdefault(current["action"], []).append(status)
        if status.state == ActionState.RUNNING and status.progress is None:
            # A slow RUNNING handler lets a terminal state that is sent too early arrive
            # while the handler still runs.
            time.sleep(0.02)
        with guard:
            active.remove(status)
        recorder(session_id, status)

    recorder = Recorder()
    session, _ = new_session(callback=tag)
    echo = shutil.which("echo", path="/usr/bin:/bin")
    true = shutil.which("true", path="/usr/bin:/bin")
    assert echo is not None and true is not None
    count = 40

    for index in range(count):
        current["action"] = index
        if index % 2:
            action = {"command": echo, "args": [f"openjd_progress: {index}"]}
        else:
            action = {"command": true}
        final = run_task_and_wait(session, recorder, step_script(action))
        assert final.state == ActionState.SUCCESS
    current["action"] = count
    # A late callback of an action would be listed under a later action or under ``count``.
    # Give such callbacks a moment to arrive before checking.
    time.sleep(0.5)

    assert overlaps == []
    assert sorted(by_action) == list(range(count))
    for index, statuses in by_action.items():
        states = [status.state for status in statuses]
        assert states[0] == ActionState.RUNNING, (index, states)
        assert statuses[0].progress is None
        assert states[-1] == ActionState.SUCCESS, (index, states)
        assert states.count(ActionState.SUCCESS) == 1, (index, states)
        progress = {status.progress for status in statuses} - {None}
        assert progress == ({float(index)} if index % 2 else set()), (index, statuses)


# ----- 20. a callback may start the next action ---------------------------------------------


def test_callback_chains_next_actions(new_session: SessionFactory, tmp_path: Path, log_store: RecordStore) -> None:
    printer = write_child(tmp_path, "print_args.py", PRINT_ARGS)
    outer = environment("Outer", variables={"OUTER": "1"})
    inner = environment(
        "Inner", on_enter=python_action(printer, "inner entered"), on_exit=python_action(printer, "inner exited")
    )
    tasks = [step_script(python_action(printer, f"task {number}")) for number in range(1, 5)]
    steps: list[Callable[[], object]] = []
    finals: list[ActionStatus] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def chain(session_id: str, status: ActionStatus) -> None:
        if status.state not in TERMINAL_STATES:
            return
        finals.append(status)
        if status.state != ActionState.SUCCESS or not steps:
            done.set()
            return
        try:
            steps.pop(0)()
        except BaseException as err:  # noqa: BLE001 (reported by the test below)
            errors.append(err)
            done.set()

    session, _ = new_session(session_id="chain", callback=chain)
    steps.append(lambda: session.enter_environment(environment=inner, identifier="inner"))
    steps.extend(functools.partial(start_task, session, task) for task in tasks)
    steps.append(lambda: session.exit_environment(identifier="inner", keep_session_running=True))
    steps.append(lambda: session.exit_environment(identifier="outer"))
    session.enter_environment(environment=outer, identifier="outer")

    assert done.wait(HANG_GUARD)
    assert errors == []
    assert [status.state for status in finals] == [ActionState.SUCCESS] * 8
    assert steps == []
    assert log_store.output("chain") == [
        "inner entered",
        "task 1",
        "task 2",
        "task 3",
        "task 4",
        "inner exited",
    ]
    wait_for(lambda: session.state == SessionState.READY_ENDING, "the session to end its last action", timeout=5)
    assert session.environments_entered == ()


# ----- 21. a failing callback does not break the session ------------------------------------


def test_callback_exception_logged_action_tracked(
    new_session: SessionFactory, tmp_path: Path, log_store: RecordStore
) -> None:
    recorder = Recorder()

    def failing(session_id: str, status: ActionStatus) -> None:
        recorder(session_id, status)
        raise RuntimeError("callback failure for the test")

    session, _ = new_session(session_id="failing", callback=failing)
    printer = write_child(tmp_path, "print_args.py", PRINT_ARGS)
    lines = [f"line {index}" for index in range(200)]
    task = step_script(python_action(printer, "openjd_progress: 10", *lines, "openjd_status: almost", "last line"))

    final = run_task_and_wait(session, recorder, task)
    second = run_task_and_wait(session, recorder, step_script(python_action(printer, "second task")))

    assert final.state == ActionState.SUCCESS
    assert final.progress == 10.0
    assert final.status_message == "almost"
    assert second.state == ActionState.SUCCESS
    assert session.state == SessionState.READY
    assert session.action_status is not None
    assert session.action_status.state == ActionState.SUCCESS
    output = log_store.output("failing")
    assert output == ["openjd_progress: 10", *lines, "openjd_status: almost", "last line", "second task"]
    failures = [
        record
        for record in log_store.records
        if record.levelno == logging.ERROR and getattr(record, "session_id", None) == "failing"
    ]
    # RUNNING, progress, status and the terminal state of each task reach the callback.
    assert len(failures) == len(recorder.statuses)
    for record in failures:
        assert record.exc_info is not None
        assert isinstance(record.exc_info[1], RuntimeError)
        assert "callback failure for the test" in str(record.exc_info[1])


# ----- 22. concurrent sessions are isolated -------------------------------------------------

WAIT_FOR_PEERS = """
import os, sys, time
directory, index, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
open(os.path.join(directory, f"started-{index}"), "w").close()
deadline = time.monotonic() + 60
while len([n for n in os.listdir(directory) if n.startswith("started-")]) < count:
    if time.monotonic() > deadline:
        sys.exit("the other sessions did not start")
    time.sleep(0.01)
for line in sys.argv[4:]:
    print(bytes.fromhex(line).decode(), flush=True)
"""


def test_concurrent_sessions_keep_records_apart(
    new_session: SessionFactory, tmp_path: Path, log_store: RecordStore
) -> None:
    count = 4
    secrets = [f"secret-of-session-{index}" for index in range(count)]
    hex_printer = write_child(tmp_path, "print_hex_args.py", PRINT_HEX_ARGS)
    waiter = write_child(tmp_path, "wait_for_peers.py", WAIT_FOR_PEERS)
    rendezvous = tmp_path / "rendezvous"
    rendezvous.mkdir()
    start_together = threading.Barrier(count)
    results: dict[int, list[ActionStatus]] = {}
    errors: list[BaseException] = []

    def run_one(index: int) -> None:
        try:
            session, recorder = new_session(session_id=f"concurrent{index}", revision_extensions=REDACTION)
            env = environment(
                "Secret", on_enter=python_action(hex_printer, *hex_args(f"openjd_redacted_env: TOKEN={secrets[index]}"))
            )
            lines = hex_args(f"line from {index}", "peers: " + " ".join(secrets))
            task = step_script(python_action(waiter, str(rendezvous), str(index), str(count), *lines))
            start_together.wait(HANG_GUARD)
            entered = run_and_wait(recorder, lambda: session.enter_environment(environment=env))
            ran = run_task_and_wait(session, recorder, task)
            results[index] = [entered, ran]
        except BaseException as err:  # noqa: BLE001 (reported by the test below)
            errors.append(err)

    threads = [threading.Thread(target=run_one, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG_GUARD)

    assert errors == []
    assert sorted(results) == list(range(count))
    for index in range(count):
        assert [status.state for status in results[index]] == [ActionState.SUCCESS, ActionState.SUCCESS]
        session_id = f"concurrent{index}"
        output = log_store.output(session_id)
        assert f"line from {index}" in output
        expected_peers = "peers: " + " ".join(MASK if peer == index else secrets[peer] for peer in range(count))
        assert expected_peers in output
        carriers = {
            getattr(record, "session_id", None)
            for record in log_store.records
            if record.getMessage() in (f"line from {index}", f"Initializing Open Job Description Session: {session_id}")
        }
        assert carriers == {session_id}
    for record in log_store.records:
        carrier = getattr(record, "session_id", None)
        message = record.getMessage()
        for index in range(count):
            if f"/concurrent{index}" in message:
                assert carrier == f"concurrent{index}", message
