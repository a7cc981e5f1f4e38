"""The logging contract: records, content flags, banners, transcripts, log levels, redaction."""

from __future__ import annotations

import logging
import os
import re
import shlex
import sys
import threading
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, Optional

import openjd.model
import pytest
from helpers import (
    PYTHON,
    CallbackRecorder,
    LogCollector,
    LogEntry,
    SessionFactory,
    build_job,
    environment,
    find_environment,
    find_step_script,
    parameter_values,
    python_action,
    python_step,
    session_id_of,
    step_script,
)
from openjd.model import RevisionExtensions, SpecificationRevision

import openjd.sessions
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

pytestmark = pytest.mark.skipif(os.name != "posix", reason="runs POSIX processes")

SECTION_LINE = "=" * 46
SUBSECTION_LINE = "-" * 46
REDACTION = RevisionExtensions(spec_rev=SpecificationRevision.v2023_09, supported_extensions=["REDACTED_ENV_VARS"])
NOT_ENABLED_WARNING = "Received openjd_redacted_env message but REDACTED_ENV_VARS extension is not enabled"

# (levelname, content, message) of the records the library logs, with None for no flag.
Line = tuple[str, Optional[LogContent], str]


@pytest.fixture
def make_session(tmp_path: Path) -> Iterator[SessionFactory]:
    root = tmp_path / "root"
    root.mkdir()
    factory = SessionFactory(root)
    yield factory
    factory.close()


@pytest.fixture
def logs() -> Iterator[LogCollector]:
    with LogCollector().attached() as collector:
        yield collector


def lines(entries: list[LogEntry]) -> list[Line]:
    return [(entry.levelname, entry.content, entry.message) for entry in entries]


def section(title: str) -> list[Line]:
    return [
        ("INFO", None, ""),
        ("INFO", LogContent.BANNER, SECTION_LINE),
        ("INFO", LogContent.BANNER, f"--------- {title}"),
        ("INFO", LogContent.BANNER, SECTION_LINE),
    ]


def subsection(title: str) -> list[Line]:
    return [
        ("INFO", LogContent.BANNER, SUBSECTION_LINE),
        ("INFO", LogContent.BANNER, title),
        ("INFO", LogContent.BANNER, SUBSECTION_LINE),
    ]


def launch(argv: list[str], pid: int) -> list[Line]:
    return [
        ("INFO", LogContent.FILE_PATH | LogContent.PROCESS_CONTROL, f"Running command {shlex.join(argv)}"),
        ("INFO", LogContent.PROCESS_CONTROL, f"Command started as pid: {pid}"),
        ("INFO", LogContent.BANNER | LogContent.COMMAND_OUTPUT, "Output:"),
    ]


def output(*texts: str) -> list[Line]:
    return [("INFO", LogContent.COMMAND_OUTPUT, text) for text in texts]


def exited(pid: int, code: int) -> list[Line]:
    return [
        (
            "INFO",
            LogContent.PROCESS_CONTROL,
            f"Process pid {pid} exited with code: {code} (unsigned) / {hex(code)} (hex)",
        )
    ]


def pids(entries: list[LogEntry]) -> list[int]:
    return [int(e.message.rsplit(" ", 1)[1]) for e in entries if e.message.startswith("Command started as pid: ")]


def after_construction(logs: LogCollector, session: Session) -> list[LogEntry]:
    entries = logs.snapshot(session_id_of(session))
    marker = f"Session's Embedded Files Directory: {session.files_directory}"
    messages = [entry.message for entry in entries]
    if marker not in messages:
        return entries
    return entries[messages.index(marker) + 1 :]


def run(recorder: CallbackRecorder, start: Any, **kwargs: Any) -> ActionStatus:
    """Call ``start(**kwargs)`` and return the final status of the action it starts."""
    start(**kwargs)
    return recorder.wait_final()


# ----- construction ------------------------------------------------------------------------


def test_host_info_block(make_session: SessionFactory, logs: LogCollector) -> None:
    session = make_session(session_id="hostinfo")
    installed_at = Path(openjd.sessions.__file__).resolve().parent.parent
    python_version = sys.version.replace("\n", " - ")
    host = LogContent.HOST_INFO

    entries = logs.snapshot()

    assert [(e.levelname, e.content, e.session_id, e.msg, e.message) for e in entries] == [
        ("INFO", host, "hostinfo", *[f"openjd.model Library Version: {openjd.model.version}"] * 2),
        ("INFO", host, "hostinfo", *["openjd.sessions Library Version: 0.10.8"] * 2),
        ("INFO", host, "hostinfo", "Installed at: %s", f"Installed at: {installed_at}"),
        ("INFO", host, "hostinfo", *[f"Python Interpreter: {sys.executable}"] * 2),
        ("INFO", host, "hostinfo", "Python Version: %s", f"Python Version: {python_version}"),
        ("INFO", host, "hostinfo", *[f"Platform: {sys.platform}"] * 2),
        ("INFO", None, "hostinfo", *["Initializing Open Job Description Session: hostinfo"] * 2),
        ("INFO", LogContent.FILE_PATH, "hostinfo", *[f"Session Working Directory: {session.working_directory}"] * 2),
        (
            "INFO",
            LogContent.FILE_PATH,
            "hostinfo",
            *[f"Session's Embedded Files Directory: {session.files_directory}"] * 2,
        ),
    ]


def test_sticky_bit_warning_record(tmp_path: Path, logs: LogCollector) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    root = open_dir / "root"
    root.mkdir()
    session = Session(session_id="sticky", job_parameter_values={}, session_root_directory=root)
    try:
        warnings = [e for e in logs.snapshot() if e.levelname == "WARNING"]
        assert [(e.content, e.session_id, e.message) for e in warnings] == [
            (
                LogContent.HOST_INFO | LogContent.FILE_PATH,
                "sticky",
                f"Sticky bit is not set on {open_dir}. This may pose a risk when running work on this host as "
                "users may modify or delete files in this directory which do not belong to them.",
            )
        ]
    finally:
        session.cleanup()


# ----- transcripts ---------------------------------------------------------------------------


def test_canonical_task_transcript(make_session: SessionFactory, logs: LogCollector) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    script = python_step("print('hello'); print('world')")

    run(recorder, session.run_task, step_script=script, task_parameter_values=parameter_values(B=("INT", "1")))

    entries = after_construction(logs, session)
    (pid,) = pids(entries)
    assert lines(entries) == [
        *section("Running Task"),
        ("INFO", LogContent.PARAMETER_INFO, "Parameter values:"),
        ("INFO", LogContent.PARAMETER_INFO, "B(INT) = 1"),
        *subsection("Phase: Setup"),
        *subsection("Phase: Running action"),
        *launch([PYTHON, "-c", "print('hello'); print('world')"], pid),
        *output("hello", "world"),
        *exited(pid, 0),
    ]
    running = next(e for e in entries if e.message.startswith("Running command"))
    assert running.msg == "Running command %s"


def test_task_banner_can_be_skipped(make_session: SessionFactory, logs: LogCollector) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)

    run(
        recorder,
        session.run_task,
        step_script=python_step("pass"),
        task_parameter_values={},
        log_task_banner=False,
    )

    entries = after_construction(logs, session)
    assert lines(entries)[:3] == subsection("Phase: Setup")


EXAMPLE_TEMPLATE = """
specificationVersion: jobtemplate-2023-09
name: RenderDemo
parameterDefinitions:
  - name: Scene
    type: PATH
  - name: Quality
    type: STRING
    default: draft
jobEnvironments:
  - name: Toolchain
    variables:
      RENDER_QUALITY: "{{Param.Quality}}"
    script:
      actions:
        onEnter:
          command: sh
          args: ["-c", "echo preparing; echo openjd_env: TOOL_HOME=/opt/tool"]
        onExit:
          command: sh
          args: ["-c", "echo tearing down $TOOL_HOME"]
steps:
  - name: Render
    parameterSpace:
      taskParameterDefinitions:
        - name: Frame
          type: INT
          range: "1-2"
    script:
      embeddedFiles:
        - name: Run
          type: TEXT
          runnable: true
          data: |
            #!/bin/sh
            echo rendering {{Param.Scene}} frame {{Task.Param.Frame}} q=$RENDER_QUALITY tool=$TOOL_HOME
            echo openjd_progress: 100
            echo openjd_status: frame {{Task.Param.Frame}} done
      actions:
        onRun:
          command: "{{Task.File.Run}}"
"""


def test_environment_task_exit_transcript(make_session: SessionFactory, logs: LogCollector) -> None:
    job, values = build_job(EXAMPLE_TEMPLATE, {"Scene": "/mnt/projects/shot1.scn"})
    rule = PathMappingRule(
        source_path_format=PathFormat.POSIX,
        source_path=PurePosixPath("/mnt/projects"),
        destination_path=PurePosixPath("/data/projects"),
    )
    recorder = CallbackRecorder()
    session = make_session(session_id="demo", job_parameter_values=values, path_mapping_rules=[rule], callback=recorder)

    identifier = session.enter_environment(environment=find_environment(job, "Toolchain"), identifier="toolchain")
    enter_status = recorder.wait_final()
    assert session.state == SessionState.READY
    frame = parameter_values(Frame=("INT", "1"))
    task_status = run(recorder, session.run_task, step_script=find_step_script(job), task_parameter_values=frame)
    session.exit_environment(identifier=identifier)
    exit_status = recorder.wait_final()

    assert enter_status == ActionStatus(state=ActionState.SUCCESS, exit_code=0)
    assert task_status == ActionStatus(
        state=ActionState.SUCCESS, progress=100.0, status_message="frame 1 done", exit_code=0
    )
    assert exit_status == ActionStatus(state=ActionState.SUCCESS, exit_code=0)
    assert session.state == SessionState.READY_ENDING
    assert [s.state for s in recorder.statuses] == [ActionState.RUNNING, ActionState.SUCCESS] + [
        ActionState.RUNNING
    ] * 3 + [ActionState.SUCCESS, ActionState.RUNNING, ActionState.SUCCESS]
    assert recorder.statuses[3].progress == 100.0
    assert recorder.statuses[4].status_message == "frame 1 done"

    entries = after_construction(logs, session)
    enter_pid, task_pid, exit_pid = pids(entries)
    (run_file,) = [p for p in session.files_directory.iterdir()]
    assert re.fullmatch(r"tmp[a-z0-9_]{8}", run_file.name)
    assert lines(entries) == [
        *section("Entering Environment: Toolchain"),
        ("INFO", LogContent.PARAMETER_INFO, "Setting: RENDER_QUALITY=draft"),
        *subsection("Phase: Setup"),
        *subsection("Phase: Running action"),
        *launch(["sh", "-c", "echo preparing; echo openjd_env: TOOL_HOME=/opt/tool"], enter_pid),
        *output("preparing", "openjd_env: TOOL_HOME=/opt/tool"),
        *exited(enter_pid, 0),
        *section("Running Task"),
        ("INFO", LogContent.PARAMETER_INFO, "Parameter values:"),
        ("INFO", LogContent.PARAMETER_INFO, "Frame(INT) = 1"),
        *subsection("Phase: Setup"),
        ("INFO", None, "Writing embedded files for Task to disk."),
        ("INFO", LogContent.FILE_PATH | LogContent.PARAMETER_INFO, f"Mapping: Task.File.Run -> {run_file}"),
        ("INFO", LogContent.FILE_PATH, f"Wrote: Run -> {run_file}"),
        *subsection("Phase: Running action"),
        *launch([str(run_file)], task_pid),
        *output(
            "rendering /data/projects/shot1.scn frame 1 q=draft tool=/opt/tool",
            "openjd_progress: 100",
            "openjd_status: frame 1 done",
        ),
        *exited(task_pid, 0),
        *section("Exiting Environment: Toolchain"),
        *subsection("Phase: Setup"),
        *subsection("Phase: Running action"),
        *launch(["sh", "-c", "echo tearing down $TOOL_HOME"], exit_pid),
        *output("tearing down /opt/tool"),
        *exited(exit_pid, 0),
    ]
    setting = next(e for e in entries if e.message.startswith("Setting:"))
    assert setting.msg == "Setting: %s=%s"
    assert {e.session_id for e in entries} == {"demo"}


def test_nothing_to_run_logs_banner(make_session: SessionFactory, logs: LogCollector) -> None:
    session = make_session()
    env = environment({"name": "Vars", "variables": {"A": "1", "B": "two"}})

    identifier = session.enter_environment(environment=env)
    session.exit_environment(identifier=identifier)

    assert lines(after_construction(logs, session)) == [
        *section("Entering Environment: Vars"),
        ("INFO", LogContent.PARAMETER_INFO, "Setting: A=1"),
        ("INFO", LogContent.PARAMETER_INFO, "Setting: B=two"),
        *section("Exiting Environment: Vars"),
    ]


def test_embedded_file_debug_records(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    env = environment(
        {
            "name": "Files",
            "script": {
                "actions": {"onEnter": {"command": PYTHON, "args": ["{{Env.File.Code}}"]}},
                "embeddedFiles": [{"name": "Code", "type": "TEXT", "filename": "code.py", "data": "print('x')\r\n"}],
            },
        }
    )

    with LogCollector().attached(logging.DEBUG) as debug_logs:
        run(recorder, session.enter_environment, environment=env)

    path = session.files_directory / "code.py"
    entries = after_construction(debug_logs, session)
    writing = entries.index(next(e for e in entries if e.message.startswith("Writing embedded files")))
    assert [(e.levelname, e.content, e.msg, e.message) for e in entries[writing : writing + 4]] == [
        ("INFO", None, *["Writing embedded files for Environment to disk."] * 2),
        ("INFO", LogContent.FILE_PATH | LogContent.PARAMETER_INFO, *[f"Mapping: Env.File.Code -> {path}"] * 2),
        ("INFO", LogContent.FILE_PATH, *[f"Wrote: Code -> {path}"] * 2),
        ("DEBUG", LogContent.FILE_CONTENTS, "Contents:\n%s", "Contents:\nprint('x')\r\n"),
    ]


def test_prelaunch_failure_record(make_session: SessionFactory, logs: LogCollector) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)

    status = run(
        recorder,
        session.run_task,
        step_script=step_script({"actions": {"onRun": {"command": "{{Task.Param.Nope}}"}}}),
        task_parameter_values={},
    )

    failures = [e for e in after_construction(logs, session) if e.message.startswith("openjd_fail: ")]
    assert [(e.levelname, e.content, e.message) for e in failures] == [
        ("INFO", LogContent.EXCEPTION_INFO, f"openjd_fail: {status.fail_message}")
    ]
    assert "Phase: Running action" not in [e.message for e in after_construction(logs, session)]


def test_cleanup_records(make_session: SessionFactory, logs: LogCollector) -> None:
    session = make_session()

    session.cleanup()

    assert lines(after_construction(logs, session)) == [
        *section("Session Cleanup"),
        ("INFO", LogContent.FILE_PATH, f"Deleting working directory: {session.working_directory}"),
    ]


def test_concurrent_sessions_isolated(make_session: SessionFactory, logs: LogCollector) -> None:
    sessions: list[Session] = []
    recorders: list[CallbackRecorder] = []
    for index in range(4):
        recorder = CallbackRecorder()
        recorders.append(recorder)
        sessions.append(make_session(session_id=f"parallel-{index}", callback=recorder))

    def work(index: int) -> None:
        code = f"import time\nfor i in range(30):\n    print('marker-{index}', i, flush=True)\n    time.sleep(0.002)\n"
        sessions[index].run_task(step_script=python_step(code), task_parameter_values={})

    threads = [threading.Thread(target=work, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    finals = [recorder.wait_final() for recorder in recorders]

    assert [status.state for status in finals] == [ActionState.SUCCESS] * 4
    for index, session in enumerate(sessions):
        marked = [e for e in logs.snapshot() if e.message.startswith(f"marker-{index} ")]
        assert len(marked) == 30
        assert {e.session_id for e in marked} == {session_id_of(session)}
        assert set(recorders[index].session_ids) == {session_id_of(session)}


# ----- log levels and the protocol -------------------------------------------------------------


def test_protocol_works_at_warning_level(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    env = environment(
        {"name": "Quiet", "script": {"actions": {"onEnter": python_action("print('openjd_env: QUIET=yes')")}}}
    )
    code = (
        "import os\nprint('openjd_progress: 42')\nprint('openjd_status: ' + os.environ['QUIET'])\n"
        "print('openjd_fail: noted')\n"
    )

    with LogCollector().attached(logging.WARNING) as quiet_logs:
        run(recorder, session.enter_environment, environment=env)
        status = run(recorder, session.run_task, step_script=python_step(code), task_parameter_values={})

    assert status == ActionStatus(
        state=ActionState.SUCCESS, progress=42.0, status_message="yes", fail_message="noted", exit_code=0
    )
    assert [e for e in quiet_logs.snapshot() if e.levelname == "INFO"] == []


def test_runtime_loglevel_session_only(make_session: SessionFactory, logs: LogCollector) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    other_recorder = CallbackRecorder()
    other = make_session(callback=other_recorder)
    code = (
        "print('before')\n"
        "print('openjd_session_runtime_loglevel: warning')\n"
        "print('hidden')\n"
        "print('openjd_progress: 70')\n"
    )

    status = run(recorder, session.run_task, step_script=python_step(code), task_parameter_values={})
    run(
        other_recorder,
        other.run_task,
        step_script=python_step("print('other visible')"),
        task_parameter_values={},
    )

    assert status.progress == 70.0
    assert LOG.level == logging.INFO
    messages = logs.messages(session_id_of(session))
    assert "before" in messages
    assert "hidden" not in messages
    assert "openjd_progress: 70" not in messages
    assert "other visible" in logs.messages(session_id_of(other))


def test_runtime_loglevel_debug_keeps_logger(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)

    status = run(
        recorder,
        session.run_task,
        step_script=python_step("print('openjd_session_runtime_loglevel:  Debug ')"),
        task_parameter_values={},
    )

    assert status.state == ActionState.SUCCESS
    assert LOG.level == logging.INFO


def test_runtime_loglevel_unknown_annotated(make_session: SessionFactory, logs: LogCollector) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)

    run(
        recorder,
        session.run_task,
        step_script=python_step("print('openjd_session_runtime_loglevel: verbose')"),
        task_parameter_values={},
    )

    assert (
        "openjd_session_runtime_loglevel: verbose -- ERROR: Unknown log level: VERBOSE. "
        "Known values: DEBUG,INFO,WARNING,ERROR"
    ) in logs.messages(session_id_of(session))


def test_host_records_not_protocol(make_session: SessionFactory, logs: LogCollector) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    session.run_task(
        step_script=python_step("import time; time.sleep(0.5); print('openjd_status: real')"), task_parameter_values={}
    )

    extra = {"session_id": session_id_of(session)}
    LOG.info("openjd_status: from the host", extra=extra)
    LOG.info("openjd_progress: 99", extra=extra)
    LOG.info("Openjd_env: X=1", extra=extra)
    status = recorder.wait_final()

    assert status == ActionStatus(state=ActionState.SUCCESS, status_message="real", exit_code=0)
    assert "openjd_status: from the host" in logs.messages()


# ----- redaction -----------------------------------------------------------------------------


def print_hidden(line: str) -> str:
    """Return code that prints ``line`` without the line appearing in the command itself.

    The command line is logged before the action runs, so a secret written literally in it
    would reach the log before the session has registered it as a secret.
    """
    return f"print({line[::-1]!r}[::-1], flush=True)"


def secret_environment(*lines: str) -> Any:
    code = "\n".join(print_hidden(line) for line in lines)
    return environment({"name": "Secrets", "script": {"actions": {"onEnter": python_action(code)}}})


def test_redacted_env_enabled(make_session: SessionFactory, logs: LogCollector) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder, revision_extensions=REDACTION)
    env = secret_environment("openjd_redacted_env: API_TOKEN=hunter22", "same line hunter22 again")
    task = python_step(
        "import os; t = os.environ['API_TOKEN']; open('token.txt', 'w').write(t); "
        "print('token is ' + t); print('twice ' + t + t); print('100% of %s ' + t)"
    )

    assert run(recorder, session.enter_environment, environment=env).state == ActionState.SUCCESS
    assert run(recorder, session.run_task, step_script=task, task_parameter_values={}).state == ActionState.SUCCESS

    assert (session.working_directory / "token.txt").read_text() == "hunter22"
    messages = logs.messages(session_id_of(session))
    assert "openjd_redacted_env: API_TOKEN=********" in messages
    assert "same line ******** again" in messages
    assert "token is ********" in messages
    assert "twice ********" in messages
    assert "100% of %s ********" in messages
    assert not any("hunter22" in message for message in logs.messages())
    assert NOT_ENABLED_WARNING not in logs.messages()


def test_task_secret_masked_not_set(make_session: SessionFactory, logs: LogCollector) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder, revision_extensions=REDACTION)
    announce = python_step(
        print_hidden("openjd_redacted_env: TASK_KEY=t4sk-secret") + "\n" + print_hidden("t4sk-secret used")
    )
    check = python_step("import os; print('TASK_KEY is', os.environ.get('TASK_KEY', 'unset'))")

    assert run(recorder, session.run_task, step_script=announce, task_parameter_values={}).state == (
        ActionState.SUCCESS
    )
    run(recorder, session.run_task, step_script=check, task_parameter_values={})

    messages = logs.messages(session_id_of(session))
    assert "openjd_redacted_env: TASK_KEY=********" in messages
    assert "******** used" in messages
    assert "TASK_KEY is unset" in messages
    assert not any("t4sk-secret" in message for message in logs.messages())


def test_redacted_env_not_enabled(make_session: SessionFactory, logs: LogCollector) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    env = secret_environment("openjd_redacted_env: API_TOKEN=hunter22")
    task = python_step("import os; print('token is', os.environ.get('API_TOKEN', 'unset'))")

    assert run(recorder, session.enter_environment, environment=env).state == ActionState.SUCCESS
    run(recorder, session.run_task, step_script=task, task_parameter_values={})

    warnings = [e for e in logs.snapshot() if e.message == NOT_ENABLED_WARNING]
    assert [(e.levelname, e.content) for e in warnings] == [("WARNING", LogContent.COMMAND_OUTPUT)]
    assert "openjd_redacted_env: API_TOKEN=********" in logs.messages()
    assert "token is unset" in logs.messages()
    assert not any("hunter22" in message for message in logs.messages())


def test_multiline_secret_masked(make_session: SessionFactory, logs: LogCollector) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder, revision_extensions=REDACTION)
    env = secret_environment('openjd_redacted_env: "BAR=multi\\nline\\nvalue"')
    task = python_step("print('line'); print('multi'); print('xx multi yy'); print('a line b')")

    run(recorder, session.enter_environment, environment=env)
    run(recorder, session.run_task, step_script=task, task_parameter_values={})

    messages = logs.messages(session_id_of(session))
    assert 'openjd_redacted_env: "BAR=********' in messages
    assert messages[-5:-1] == ["********", "********", "xx ******** yy", "a line b"]


def test_malformed_secret_still_masked(make_session: SessionFactory, logs: LogCollector) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder, revision_extensions=REDACTION)
    env = environment(
        {
            "name": "Secrets",
            "script": {
                "actions": {
                    "onEnter": python_action(print_hidden("openjd_redacted_env: NO_EQUALS_s3cr3tpayload")),
                    "onExit": python_action("print('leak: NO_EQUALS_s3cr3tpayload')"),
                }
            },
        }
    )

    assert run(recorder, session.enter_environment, environment=env).state == ActionState.FAILED
    identifier = session.environments_entered[0]
    assert run(recorder, session.exit_environment, identifier=identifier).state == ActionState.SUCCESS

    assert "leak: ********" in logs.messages(session_id_of(session))
    assert not any("s3cr3tpayload" in message for message in logs.messages())


def test_secret_masked_in_status(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder, revision_extensions=REDACTION)
    env = secret_environment("openjd_redacted_env: KEY=s3cr3t")
    task = python_step("print('openjd_status: s3cr3t status'); print('openjd_fail: bad s3cr3t')")

    run(recorder, session.enter_environment, environment=env)
    status = run(recorder, session.run_task, step_script=task, task_parameter_values={})

    assert status.status_message == "******** status"
    assert status.fail_message == "bad ********"
    assert not any("s3cr3t" in (s.status_message or "") + (s.fail_message or "") for s in recorder.statuses)


def test_secret_masked_in_debug_records(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder, revision_extensions=REDACTION)
    script = step_script(
        {
            "actions": {"onRun": {"command": PYTHON, "args": ["-c", "pass", "s3cr3t", "{{Task.File.Notes}}"]}},
            "embeddedFiles": [{"name": "Notes", "type": "TEXT", "data": "notes about s3cr3t\n"}],
        }
    )

    with LogCollector().attached(logging.DEBUG) as debug_logs:
        run(
            recorder,
            session.enter_environment,
            environment=secret_environment("openjd_redacted_env: K=s3cr3t"),
        )
        status = run(recorder, session.run_task, step_script=script, task_parameter_values={})

    assert status.state == ActionState.SUCCESS
    messages = debug_logs.messages(session_id_of(session))
    assert "Contents:\nnotes about ********\n" in messages
    assert not any("s3cr3t" in message for message in debug_logs.messages())


def test_redaction_per_session(make_session: SessionFactory, logs: LogCollector) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder, revision_extensions=REDACTION)
    other_recorder = CallbackRecorder()
    other = make_session(callback=other_recorder, revision_extensions=REDACTION)
    run(recorder, session.enter_environment, environment=secret_environment("openjd_redacted_env: KEY=s3cr3t"))

    run(
        other_recorder,
        other.run_task,
        step_script=python_step("print('other s3cr3t')"),
        task_parameter_values={},
    )
    LOG.info("host says s3cr3t", extra={"session_id": session_id_of(session)})
    LOG.info("host without id s3cr3t")

    assert "other s3cr3t" in logs.messages(session_id_of(other))
    assert "host says ********" in logs.messages(session_id_of(session))
    assert "host without id s3cr3t" in logs.messages()
