"""How actions run: symbols, path mapping, embedded files, exit codes, output and messages."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import pytest
from helpers import (
    PYTHON,
    CallbackRecorder,
    LogCollector,
    SessionFactory,
    build_job,
    environment,
    find_step_script,
    parameter_values,
    python_action,
    python_step,
    session_id_of,
    step_script,
)

from openjd.sessions import ActionState, ActionStatus, LogContent, PathFormat, PathMappingRule, Session, SessionState

pytestmark = pytest.mark.skipif(os.name != "posix", reason="runs POSIX processes and signals")

WRITE_ARGV = "import json, sys; json.dump(sys.argv[1:], open('argv.json', 'w'))"

RULES_IN_GIVEN_ORDER = [
    PathMappingRule(
        source_path_format=PathFormat.POSIX, source_path=PurePosixPath("/a"), destination_path=PurePosixPath("/short")
    ),
    PathMappingRule(
        source_path_format=PathFormat.WINDOWS,
        source_path=PureWindowsPath("C:\\a\\b"),
        destination_path=PurePosixPath("/win"),
    ),
    PathMappingRule(
        source_path_format=PathFormat.POSIX,
        source_path=PurePosixPath("/a/b/c"),
        destination_path=PurePosixPath("/long"),
    ),
]
RULES_FILE_CONTENT = (
    '{"version": "pathmapping-1.0", "path_mapping_rules": ['
    '{"source_path_format": "POSIX", "source_path": "/a/b/c", "destination_path": "/long"}, '
    '{"source_path_format": "WINDOWS", "source_path": "C:\\\\a\\\\b", "destination_path": "/win"}, '
    '{"source_path_format": "POSIX", "source_path": "/a", "destination_path": "/short"}]}'
)


@pytest.fixture
def make_session(tmp_path: Path) -> Iterator[SessionFactory]:
    factory = SessionFactory(tmp_path)
    yield factory
    factory.close()


@pytest.fixture
def logs() -> Iterator[LogCollector]:
    with LogCollector().attached() as collector:
        yield collector


def argv_step(*args: str, **fields: Any) -> Any:
    return step_script({"actions": {"onRun": {"command": PYTHON, "args": ["-c", WRITE_ARGV, *args], **fields}}})


def written_argv(session: Session) -> list[str]:
    result: list[str] = json.loads((session.working_directory / "argv.json").read_text())
    return result


def run_task(session: Session, recorder: CallbackRecorder, script: Any, **kwargs: Any) -> ActionStatus:
    kwargs.setdefault("task_parameter_values", {})
    session.run_task(step_script=script, **kwargs)
    return recorder.wait_final()


def started_pid(logs: LogCollector, session: Session) -> int:
    started = [
        entry.message for entry in logs.snapshot(session_id_of(session)) if entry.message.startswith("Command started")
    ]
    assert len(started) == 1, started
    return int(started[0].rsplit(" ", 1)[1])


def output_lines(logs: LogCollector, session: Session) -> list[str]:
    return [
        entry.message
        for entry in logs.snapshot(session_id_of(session))
        if entry.content == LogContent.COMMAND_OUTPUT and entry.levelname == "INFO"
    ]


# ----- symbols -----------------------------------------------------------------------------


def test_job_and_task_parameter_symbols(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    job_values = parameter_values(
        S="text",
        I=("INT", "7"),
        F=("FLOAT", "1.5"),
        P=("PATH", "/a/b/c/in.txt"),
        SP="/a/b/c/not-mapped",
        W=("PATH", "c:\\A\\b\\scene.ma"),
    )
    task_values = parameter_values(
        TS="frame", TI=("INT", "3"), TF=("FLOAT", "0.25"), TP=("PATH", "/a/other/out.exr"), TC=("CHUNK[INT]", "1-3,7")
    )
    session = make_session(callback=recorder, job_parameter_values=job_values, path_mapping_rules=RULES_IN_GIVEN_ORDER)
    names = ["S", "I", "F", "P", "SP", "W"]
    task_names = ["TS", "TI", "TF", "TP", "TC"]
    args = [f"{{{{Param.{n}}}}}" for n in names] + [f"{{{{RawParam.{n}}}}}" for n in names]
    args += [f"{{{{Task.Param.{n}}}}}" for n in task_names] + [f"{{{{Task.RawParam.{n}}}}}" for n in task_names]
    args += ["{{Session.WorkingDirectory}}", "{{Session.HasPathMappingRules}}"]

    status = run_task(session, recorder, argv_step(*args), task_parameter_values=task_values)

    assert status.state == ActionState.SUCCESS
    assert written_argv(session) == [
        "text", "7", "1.5", "/long/in.txt", "/a/b/c/not-mapped", "/win/scene.ma",
        "text", "7", "1.5", "/a/b/c/in.txt", "/a/b/c/not-mapped", "c:\\A\\b\\scene.ma",
        "frame", "3", "0.25", "/short/other/out.exr", "1-3,7",
        "frame", "3", "0.25", "/a/other/out.exr", "1-3,7",
        str(session.working_directory), "true",
    ]  # fmt: skip


def test_no_rules_symbols_and_file(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder, job_parameter_values=parameter_values(P=("PATH", "/a/b/c/in.txt")))

    status = run_task(
        session,
        recorder,
        argv_step("{{Param.P}}", "{{Session.HasPathMappingRules}}", "{{Session.PathMappingRulesFile}}"),
    )

    assert status.state == ActionState.SUCCESS
    mapped, has_rules, rules_file = written_argv(session)
    assert (mapped, has_rules) == ("/a/b/c/in.txt", "false")
    assert Path(rules_file).read_text() == "{}"


def test_rules_file_exact_content(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder, path_mapping_rules=RULES_IN_GIVEN_ORDER)
    copy = "import shutil, sys; shutil.copy(sys.argv[1], 'seen_rules.json')"

    script = step_script(
        {"actions": {"onRun": {"command": PYTHON, "args": ["-c", copy, "{{Session.PathMappingRulesFile}}"]}}}
    )

    status = run_task(session, recorder, script)

    assert status.state == ActionState.SUCCESS
    assert (session.working_directory / "seen_rules.json").read_text() == RULES_FILE_CONTENT
    rules_files = list(session.working_directory.glob("tmp*.json"))
    assert len(rules_files) == 1
    assert rules_files[0].parent == session.working_directory
    assert rules_files[0].read_text() == RULES_FILE_CONTENT
    assert stat.S_IMODE(rules_files[0].stat().st_mode) == 0o600


def test_rules_file_from_embedded_file(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder, path_mapping_rules=RULES_IN_GIVEN_ORDER)
    script = step_script(
        {
            "actions": {"onRun": {"command": PYTHON, "args": ["{{Task.File.Reader}}"]}},
            "embeddedFiles": [
                {
                    "name": "Reader",
                    "type": "TEXT",
                    "data": "import shutil\nshutil.copy('{{Session.PathMappingRulesFile}}', 'seen_rules.json')\n",
                }
            ],
        }
    )

    assert run_task(session, recorder, script).state == ActionState.SUCCESS
    assert (session.working_directory / "seen_rules.json").read_text() == RULES_FILE_CONTENT


def test_environment_symbols_without_task(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(
        callback=recorder,
        job_parameter_values=parameter_values(P=("PATH", "/a/b/c/scene")),
        path_mapping_rules=RULES_IN_GIVEN_ORDER,
    )
    env = environment(
        {
            "name": "Symbols",
            "script": {
                "actions": {
                    "onEnter": {
                        "command": PYTHON,
                        "args": ["-c", WRITE_ARGV, "{{Param.P}}", "{{RawParam.P}}", "{{Session.HasPathMappingRules}}"],
                    }
                }
            },
        }
    )

    session.enter_environment(environment=env)

    assert recorder.wait_final().state == ActionState.SUCCESS
    assert written_argv(session) == ["/long/scene", "/a/b/c/scene", "true"]


def test_task_parameter_log_lines(make_session: SessionFactory, logs: LogCollector) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder, path_mapping_rules=RULES_IN_GIVEN_ORDER)
    values = parameter_values(
        B=("INT", "1"), F=("CHUNK[INT]", "1-4"), R=("FLOAT", "2.5"), N="name", P=("PATH", "/a/b/c/x")
    )

    run_task(session, recorder, python_step("pass"), task_parameter_values=values)

    entries = [entry for entry in logs.snapshot(session_id_of(session)) if entry.content == LogContent.PARAMETER_INFO]
    assert [entry.message for entry in entries] == [
        "Parameter values:",
        "B(INT) = 1",
        "F(CHUNK[INT]) = 1-4",
        "R(FLOAT) = 2.5",
        "N(STRING) = name",
        "P(PATH) = /a/b/c/x",
    ]
    assert all(entry.levelname == "INFO" for entry in entries)


def test_no_parameter_lines_without_values(make_session: SessionFactory, logs: LogCollector) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)

    run_task(session, recorder, python_step("pass"))

    assert "Parameter values:" not in logs.messages()


# ----- embedded files ----------------------------------------------------------------------


def test_task_embedded_files_written(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    script = step_script(
        {
            "actions": {"onRun": {"command": "{{Task.File.Run}}", "args": ["{{Task.File.Data}}"]}},
            "embeddedFiles": [
                {
                    "name": "Run",
                    "type": "TEXT",
                    "runnable": True,
                    "filename": "run.py",
                    "data": f"#!{PYTHON}\nimport sys\nprint('ran with', open(sys.argv[1]).read())\n",
                },
                {"name": "Data", "type": "TEXT", "data": "points to {{Task.File.Other}}"},
                {"name": "Other", "type": "TEXT", "data": "self is {{Task.File.Other}}", "endOfLine": "CRLF"},
            ],
        }
    )

    status = run_task(session, recorder, script)

    assert status.state == ActionState.SUCCESS
    run_file = session.files_directory / "run.py"
    assert stat.S_IMODE(run_file.stat().st_mode) == 0o700
    data_files = sorted(p for p in session.files_directory.iterdir() if p.name != "run.py")
    assert len(data_files) == 2
    assert all(re.fullmatch(r"tmp[a-z0-9_]{8}", p.name) for p in data_files)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in data_files)
    contents = {p.read_bytes() for p in data_files}
    other = next(p for p in data_files if p.read_bytes().startswith(b"self is"))
    assert contents == {f"points to {other}".encode(), f"self is {other}".encode()}


def test_runnable_file_without_shebang(make_session: SessionFactory, logs: LogCollector) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    script = step_script(
        {
            "actions": {"onRun": {"command": "{{Task.File.Plain}}"}},
            "embeddedFiles": [{"name": "Plain", "type": "TEXT", "runnable": True, "data": "echo plain shell script\n"}],
        }
    )

    status = run_task(session, recorder, script)

    assert status.state == ActionState.SUCCESS
    assert "plain shell script" in output_lines(logs, session)


def test_environment_files_each_action(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    env = environment(
        {
            "name": "Files",
            "script": {
                "actions": {
                    "onEnter": {"command": PYTHON, "args": ["{{Env.File.Script}}", "enter"]},
                    "onExit": {"command": PYTHON, "args": ["{{Env.File.Script}}", "exit"]},
                },
                "embeddedFiles": [
                    {
                        "name": "Script",
                        "type": "TEXT",
                        "data": "import sys\nopen(sys.argv[1] + '.txt', 'w').write(__file__)\n",
                    }
                ],
            },
        }
    )

    identifier = session.enter_environment(environment=env)
    assert recorder.wait_final().state == ActionState.SUCCESS
    session.exit_environment(identifier=identifier)
    assert recorder.wait_final().state == ActionState.SUCCESS

    enter_path = Path((session.working_directory / "enter.txt").read_text())
    exit_path = Path((session.working_directory / "exit.txt").read_text())
    assert enter_path.parent == session.files_directory
    assert exit_path.parent == session.files_directory
    assert enter_path != exit_path
    assert enter_path.exists()


@pytest.mark.parametrize("filename", ["../escape.txt", "<absolute>", "sub/dir.txt", ".."])
def test_embedded_filename_outside_rejected(
    make_session: SessionFactory, logs: LogCollector, tmp_path: Path, filename: str
) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    absolute = tmp_path / "absolute-escape.txt"
    filename = filename.replace("<absolute>", str(absolute))
    script = step_script(
        {
            "actions": {"onRun": python_action("open('ran.txt', 'w').write('x')")},
            "embeddedFiles": [{"name": "Bad", "type": "TEXT", "filename": filename, "data": "escaped"}],
        }
    )
    before = set(tmp_path.iterdir())

    status = run_task(session, recorder, script)

    assert status.state == ActionState.FAILED
    assert status.exit_code is None
    assert status.fail_message is not None
    assert filename in status.fail_message
    assert session.state == SessionState.READY_ENDING
    assert not (session.working_directory / "ran.txt").exists()
    assert set(tmp_path.iterdir()) == before
    assert not absolute.exists()
    assert "Phase: Running action" not in logs.messages()


# ----- timeouts given as format strings ----------------------------------------------------


@pytest.mark.slow
def test_created_job_timeout_format(make_session: SessionFactory) -> None:
    job, values = build_job(
        f"""
specificationVersion: jobtemplate-2023-09
extensions: [FEATURE_BUNDLE_1]
name: timeout-format
parameterDefinitions:
  - name: Limit
    type: INT
    default: 1
steps:
  - name: Slow
    script:
      actions:
        onRun:
          command: {PYTHON}
          args: ["-c", "import time; time.sleep(30)"]
          timeout: "{{{{Param.Limit}}}}"
"""
    )
    recorder = CallbackRecorder()
    session = make_session(callback=recorder, job_parameter_values=values)

    status = run_task(session, recorder, find_step_script(job))

    assert status.state == ActionState.TIMEOUT
    assert status.exit_code == -9


@pytest.mark.slow
def test_unresolved_timeout_resolved_by_session(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder, job_parameter_values=parameter_values(Limit=("INT", "1")))
    script = python_step("import time; time.sleep(30)", timeout="{{Param.Limit}}")

    status = run_task(session, recorder, script)

    assert status.state == ActionState.TIMEOUT


@pytest.mark.parametrize("value", ["soon", "0", "-3", "1.5"])
def test_invalid_timeout_fails_action(make_session: SessionFactory, value: str) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder, job_parameter_values=parameter_values(Limit=value))
    script = python_step("open('ran.txt', 'w').write('x')", timeout="{{Param.Limit}}")

    status = run_task(session, recorder, script)

    assert status.state == ActionState.FAILED
    assert status.exit_code is None
    assert status.fail_message is not None
    assert "timeout" in status.fail_message
    assert session.state == SessionState.READY_ENDING
    assert not (session.working_directory / "ran.txt").exists()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_interpreter_sugar_step_runs(make_session: SessionFactory, logs: LogCollector) -> None:
    job, values = build_job(
        """
specificationVersion: jobtemplate-2023-09
extensions: [FEATURE_BUNDLE_1]
name: sugar
steps:
  - name: S1 x
    bash:
      script: |
        echo "sugar $1 from $(basename "$0")"
      args: ["arg"]
"""
    )
    recorder = CallbackRecorder()
    session = make_session(callback=recorder, job_parameter_values=values)

    status = run_task(session, recorder, find_step_script(job))

    assert status.state == ActionState.SUCCESS
    lines = [line for line in output_lines(logs, session) if line.startswith("sugar")]
    assert len(lines) == 1
    assert re.fullmatch(r"sugar arg from S1_x_[A-Za-z0-9]{6}\.sh", lines[0])


# ----- exit codes and process lines ---------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "state", "exit_code"),
    [
        ("import sys; sys.exit(0)", ActionState.SUCCESS, 0),
        ("import sys; sys.exit(3)", ActionState.FAILED, 3),
        ("import sys; sys.exit(255)", ActionState.FAILED, 255),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", ActionState.FAILED, -9),
        ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", ActionState.FAILED, -15),
    ],
)
def test_exit_code_to_state(
    make_session: SessionFactory, logs: LogCollector, code: str, state: ActionState, exit_code: int
) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)

    status = run_task(session, recorder, python_step(code))

    assert status.state == state
    assert status.exit_code == exit_code
    pid = started_pid(logs, session)
    exit_lines = [entry for entry in logs.snapshot(session_id_of(session)) if entry.message.startswith("Process pid")]
    assert [(entry.message, entry.content) for entry in exit_lines] == [
        (
            f"Process pid {pid} exited with code: {exit_code} (unsigned) / {hex(exit_code)} (hex)",
            LogContent.PROCESS_CONTROL,
        )
    ]
    expected_state = SessionState.READY if state == ActionState.SUCCESS else SessionState.READY_ENDING
    assert session.state == expected_state


def test_signal_exit_line_format(make_session: SessionFactory, logs: LogCollector) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)

    run_task(session, recorder, python_step("import os, signal; os.kill(os.getpid(), signal.SIGKILL)"))

    pid = started_pid(logs, session)
    assert f"Process pid {pid} exited with code: -9 (unsigned) / -0x9 (hex)" in logs.messages()


def test_missing_command_fails(make_session: SessionFactory, logs: LogCollector) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    script = step_script({"actions": {"onRun": {"command": "no-such-command-zq81", "args": ["--frame", "1"]}}})

    status = run_task(session, recorder, script)

    assert status.state == ActionState.FAILED
    assert session.state == SessionState.READY_ENDING
    assert "no-such-command-zq81" in logs.text()
    assert "Running command None" not in logs.text()
    if status.exit_code is None:
        # Started without a shell: the start failure is logged and reported, and no exit line.
        assert status.fail_message is not None
        assert "no-such-command-zq81" in status.fail_message
        failures = logs.starting_with("Process failed to start: ")
        assert [entry.content for entry in failures] == [LogContent.EXCEPTION_INFO | LogContent.PROCESS_CONTROL]
        assert not logs.starting_with("Process pid")
    else:
        # Started through /bin/sh, which reports a missing command with exit code 127.
        assert status.exit_code == 127


def test_non_executable_command_fails(make_session: SessionFactory, tmp_path: Path) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    not_executable = tmp_path / "data.txt"
    not_executable.write_text("echo should not run\n")
    not_executable.chmod(0o644)

    status = run_task(session, recorder, step_script({"actions": {"onRun": {"command": str(not_executable)}}}))

    assert status.state == ActionState.FAILED
    assert status.exit_code in (None, 126)
    assert status.fail_message or status.exit_code == 126


def test_command_found_on_action_path(make_session: SessionFactory, tmp_path: Path) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    tools = tmp_path / "tools"
    tools.mkdir()
    tool = tools / "openjd-test-tool"
    tool.write_text(f"#!{PYTHON}\nopen('tool-ran.txt', 'w').write('yes')\n")
    tool.chmod(0o755)
    script = step_script({"actions": {"onRun": {"command": "openjd-test-tool"}}})

    status = run_task(session, recorder, script, os_env_vars={"PATH": f"{tools}:{os.environ.get('PATH', '')}"})

    assert status.state == ActionState.SUCCESS
    assert (session.working_directory / "tool-ran.txt").read_text() == "yes"


def test_relative_command_uses_working_directory(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    tool = session.working_directory / "local-tool"
    tool.write_text(f"#!{PYTHON}\nprint('local tool ran')\n")
    tool.chmod(0o700)

    status = run_task(session, recorder, step_script({"actions": {"onRun": {"command": "./local-tool"}}}))

    assert status.state == ActionState.SUCCESS


# ----- run_subprocess ----------------------------------------------------------------------


def test_subprocess_arguments_literal(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    literal = ["{{Session.WorkingDirectory}}", "{{", "}}", "two\nlines", "tab\there", "$HOME", "'quoted'", ""]

    session.run_subprocess(command=PYTHON, args=["-c", WRITE_ARGV, *literal])

    assert recorder.wait_final().state == ActionState.SUCCESS
    assert written_argv(session) == literal


def test_subprocess_banner_and_phases(make_session: SessionFactory, logs: LogCollector) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)

    session.run_subprocess(command=PYTHON, args=["-c", "pass"], log_banner_message="Collect diagnostics")
    recorder.wait_final()
    session.run_subprocess(command=PYTHON, args=["-c", "pass"])
    recorder.wait_final()

    messages = logs.messages(session_id_of(session))
    banner = ["", "=" * 46, "--------- Collect diagnostics", "=" * 46]
    start = messages.index("--------- Collect diagnostics") - 2
    assert messages[start : start + 4] == banner
    assert messages.count("--------- Collect diagnostics") == 1
    assert messages.count("Phase: Setup") == 2
    assert messages.count("Phase: Running action") == 2
    assert list(session.working_directory.glob("*.json")) == []


def test_subprocess_messages_and_env_lines(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    code = "print('openjd_progress: 30'); print('openjd_status: diag'); print('openjd_env: FROM_SUBPROCESS=1')"

    session.run_subprocess(command=PYTHON, args=["-c", code])
    first = recorder.wait_final()
    session.run_subprocess(command=PYTHON, args=["-c", "import os; print(os.environ.get('FROM_SUBPROCESS'))"])
    recorder.wait_final()

    assert first == ActionStatus(state=ActionState.SUCCESS, progress=30.0, status_message="diag", exit_code=0)
    assert session.state == SessionState.READY


def test_subprocess_failure_ends_session(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)

    session.run_subprocess(command=PYTHON, args=["-c", "raise SystemExit(2)"])

    assert recorder.wait_final() == ActionStatus(state=ActionState.FAILED, exit_code=2)
    assert session.state == SessionState.READY_ENDING


@pytest.mark.slow
def test_subprocess_timeout_state(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)

    session.run_subprocess(command=PYTHON, args=["-c", "import time; time.sleep(30)"], timeout=1)

    assert recorder.wait_final().state == ActionState.TIMEOUT


def test_subprocess_nul_argument_rejected(make_session: SessionFactory) -> None:
    session = make_session()

    with pytest.raises(ValueError):
        session.run_subprocess(command=PYTHON, args=["-c", "pass", "nul\0here"])
    assert session.state == SessionState.READY


# ----- output ------------------------------------------------------------------------------


def test_output_line_splitting(make_session: SessionFactory, logs: LogCollector) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    code = (
        "import sys; w = sys.stdout.buffer.write; "
        "w(b'x\\r\\ny\\rz\\n'); w(b'  indented\\t  \\n'); sys.stdout.flush(); "
        "sys.stderr.write('to stderr\\n'); sys.stderr.flush(); w(b'no newline at end')"
    )

    run_task(session, recorder, python_step(code))

    assert output_lines(logs, session) == ["x", "y", "z", "  indented\t  ", "to stderr", "no newline at end"]


def test_long_line_in_pieces(make_session: SessionFactory, logs: LogCollector) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)

    run_task(session, recorder, python_step("print('a' * 70000)"))

    assert [len(line) for line in output_lines(logs, session)] == [64000, 6000]


def test_percent_logged_as_printed(make_session: SessionFactory, logs: LogCollector) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)

    run_task(session, recorder, python_step("print('100% done %s %% %(x)s')"))

    assert output_lines(logs, session) == ["100% done %s %% %(x)s"]


def test_invalid_utf8_replaced(make_session: SessionFactory, logs: LogCollector) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    code = "import sys; sys.stdout.buffer.write(b'bad \\x97 byte\\nopenjd_progress: 60\\nafter\\n')"

    status = run_task(session, recorder, python_step(code))

    assert status.state == ActionState.SUCCESS
    assert status.progress == 60.0
    lines = output_lines(logs, session)
    assert lines[0].startswith("bad ")
    assert lines[0].endswith(" byte")
    assert "\x97" not in lines[0]
    assert lines[-1] == "after"


def test_stdin_is_empty(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)

    status = run_task(session, recorder, python_step("import sys; sys.exit(len(sys.stdin.read()))"))

    assert status == ActionStatus(state=ActionState.SUCCESS, exit_code=0)


# ----- progress, status and fail messages ---------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "value"), [("10", 10.0), ("10.5", 10.5), (" 20 ", 20.0), ("1e1", 10.0), ("0", 0.0)]
)
def test_progress_accepted(make_session: SessionFactory, payload: str, value: float) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)

    status = run_task(session, recorder, python_step(f"print('openjd_progress: {payload}')"))

    assert status.progress == value
    assert [s.progress for s in recorder.statuses] == [None, value, value]


@pytest.mark.parametrize("payload", ["101", "abc", "-1", "nan"])
def test_progress_rejected(make_session: SessionFactory, logs: LogCollector, payload: str) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)

    status = run_task(
        session, recorder, python_step(f"print('openjd_progress: 5'); print('openjd_progress: {payload}')")
    )

    assert status.state == ActionState.SUCCESS
    assert status.progress == 5.0
    suffix = " -- ERROR: Progress must be a floating point value between 0.0 and 100.0, inclusive."
    assert f"openjd_progress: {payload}{suffix}" in output_lines(logs, session)


def test_status_and_fail_payload_exact(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    code = "print('openjd_status:   spaced: text  '); print('openjd_fail:  reason: x ')"

    status = run_task(session, recorder, python_step(code))

    assert status == ActionStatus(
        state=ActionState.SUCCESS, status_message="  spaced: text  ", fail_message=" reason: x ", exit_code=0
    )


def test_fail_message_does_not_fail(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)

    status = run_task(session, recorder, python_step("print('openjd_fail: only a reason')"))

    assert status == ActionStatus(state=ActionState.SUCCESS, fail_message="only a reason", exit_code=0)
    assert session.state == SessionState.READY


@pytest.mark.parametrize(
    "line", ["openjd_progress:40", "  openjd_progress: 30", "OPENJD_STATUS: x", "openjd_status: ", "openjd_unknown: x"]
)
def test_near_messages_are_output(make_session: SessionFactory, logs: LogCollector, line: str) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)

    status = run_task(session, recorder, python_step(f"print({line!r})"))

    assert status == ActionStatus(state=ActionState.SUCCESS, exit_code=0)
    assert recorder.states == [ActionState.RUNNING, ActionState.SUCCESS]
    assert line in output_lines(logs, session)


def test_env_messages_no_callback(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    lines = ["openjd_env: A=1", "openjd_unset_env: A", "openjd_session_runtime_loglevel: INFO"]
    env = environment(
        {"name": "Quiet", "script": {"actions": {"onEnter": python_action("\n".join(f"print({x!r})" for x in lines))}}}
    )

    session.enter_environment(environment=env)

    assert recorder.wait_final().state == ActionState.SUCCESS
    assert recorder.states == [ActionState.RUNNING, ActionState.SUCCESS]


def test_killed_by_signal_not_canceled(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    code = (
        "import os, signal, time\n"
        "signal.signal(signal.SIGINT, signal.SIG_DFL)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(5)\n"
    )

    status = run_task(session, recorder, python_step(code))

    assert status.state == ActionState.FAILED
    assert status.exit_code == -int(signal.SIGINT)
