"""Environment variables of actions: layering, environment messages and exact values."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest
from helpers import (
    PYTHON,
    CallbackRecorder,
    LogCollector,
    SessionFactory,
    environment,
    parameter_values,
    python_action,
    python_step,
    session_id_of,
)

from openjd.sessions import ActionState, Session, SessionState

pytestmark = pytest.mark.skipif(os.name != "posix", reason="runs POSIX processes")

HOST_VARIABLE = "OPENJD_TEST_HOST_VARIABLE"


@pytest.fixture
def make_session(tmp_path: Path) -> Iterator[SessionFactory]:
    factory = SessionFactory(tmp_path)
    yield factory
    factory.close()


@pytest.fixture
def logs() -> Iterator[LogCollector]:
    with LogCollector().attached() as collector:
        yield collector


def dump_code(label: str, names: tuple[str, ...]) -> str:
    """Return Python code that writes the listed variables (None if unset) to ``<label>.json``."""
    return (
        "import json, os\n"
        f"names = {list(names)!r}\n"
        f"with open({label + '.json'!r}, 'w') as out:\n"
        "    json.dump(dict((n, os.environ.get(n)) for n in names), out)\n"
    )


def dump_step(label: str, *names: str) -> Any:
    return python_step(dump_code(label, names))


def seen(session: Session, label: str) -> dict[str, Optional[str]]:
    result: dict[str, Optional[str]] = json.loads((session.working_directory / f"{label}.json").read_text())
    return result


def printing_environment(name: str, *lines: str, variables: Optional[dict[str, str]] = None, **actions: Any) -> Any:
    """Return an environment whose ``onEnter`` prints ``lines``, plus the actions in ``actions``."""
    code = "\n".join(f"print({line!r}, flush=True)" for line in lines) or "pass"
    document: dict[str, Any] = {"name": name, "script": {"actions": {"onEnter": python_action(code), **actions}}}
    if variables:
        document["variables"] = variables
    return environment(document)


def run_ok(recorder: CallbackRecorder, start: Any, **kwargs: Any) -> None:
    """Call ``start(**kwargs)`` and check that the action it starts ends SUCCESS."""
    start(**kwargs)
    status = recorder.wait_final()
    assert status.state == ActionState.SUCCESS, status


# ----- layering ----------------------------------------------------------------------------


def test_precedence_observed_example(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder, os_env_vars={"OVR": "fromsession", "SESSION_ONLY": "s"})
    declaring = environment({"name": "Declares", "variables": {"OVR": "fromenv", "ENV_ONLY": "e"}})
    names = ("OVR", "SESSION_ONLY", "ENV_ONLY", "OPENJD_SESSION_WORKING_DIR")
    session.enter_environment(environment=declaring)
    recorder.wait_final()

    run_ok(
        recorder,
        session.run_task,
        step_script=dump_step("task", *names),
        task_parameter_values={},
        os_env_vars={"OVR": "fromcall"},
    )
    run_ok(
        recorder,
        session.run_subprocess,
        command=PYTHON,
        args=["-c", dump_code("isolated", names)],
        os_env_vars={"OVR": "fromcall"},
        use_session_env_vars=False,
    )
    run_ok(
        recorder,
        session.run_subprocess,
        command=PYTHON,
        args=["-c", dump_code("layered", names)],
        os_env_vars={"OVR": "fromcall"},
    )

    working_directory = str(session.working_directory)
    assert seen(session, "task") == {
        "OVR": "fromenv",
        "SESSION_ONLY": "s",
        "ENV_ONLY": "e",
        "OPENJD_SESSION_WORKING_DIR": working_directory,
    }
    assert seen(session, "isolated") == {
        "OVR": "fromcall",
        "SESSION_ONLY": "s",
        "ENV_ONLY": None,
        "OPENJD_SESSION_WORKING_DIR": working_directory,
    }
    assert seen(session, "layered") == seen(session, "task")


def test_call_overrides_constructor(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder, os_env_vars={"A": "session", "B": "session"})

    run_ok(
        recorder,
        session.run_task,
        step_script=dump_step("vars", "A", "B"),
        task_parameter_values={},
        os_env_vars={"A": "call"},
    )

    assert seen(session, "vars") == {"A": "call", "B": "session"}


def test_working_dir_variable_layers(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder, os_env_vars={"OPENJD_SESSION_WORKING_DIR": "/from/constructor"})
    step = dump_step("default", "OPENJD_SESSION_WORKING_DIR")

    run_ok(recorder, session.run_task, step_script=step, task_parameter_values={})
    override = dump_step("override", "OPENJD_SESSION_WORKING_DIR")
    run_ok(
        recorder,
        session.run_task,
        step_script=override,
        task_parameter_values={},
        os_env_vars={"OPENJD_SESSION_WORKING_DIR": "/from/call"},
    )

    # The session's value wins over the constructor's variables. A call's variables win over it.
    assert seen(session, "default") == {"OPENJD_SESSION_WORKING_DIR": str(session.working_directory)}
    assert seen(session, "override") == {"OPENJD_SESSION_WORKING_DIR": "/from/call"}


def test_host_environment_inherited(make_session: SessionFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HOST_VARIABLE, "from-host")
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)

    run_ok(recorder, session.run_task, step_script=dump_step("host", HOST_VARIABLE), task_parameter_values={})

    assert seen(session, "host") == {HOST_VARIABLE: "from-host"}


def test_unset_env_removes_host_variable(make_session: SessionFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HOST_VARIABLE, "from-host")
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    unsetting = printing_environment("Unsetter", f"openjd_unset_env: {HOST_VARIABLE}")

    identifier = session.enter_environment(environment=unsetting)
    assert recorder.wait_final().state == ActionState.SUCCESS
    run_ok(recorder, session.run_task, step_script=dump_step("inside", HOST_VARIABLE), task_parameter_values={})
    session.exit_environment(identifier=identifier, keep_session_running=True)
    recorder.wait_final()
    run_ok(recorder, session.run_task, step_script=dump_step("after", HOST_VARIABLE), task_parameter_values={})

    assert seen(session, "inside") == {HOST_VARIABLE: None}
    assert seen(session, "after") == {HOST_VARIABLE: "from-host"}


def test_messages_override_declared_variables(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    env = environment(
        {
            "name": "Mixed",
            "variables": {"X": "declared", "Y": "declared"},
            "script": {
                "actions": {
                    "onEnter": python_action(dump_code("enter", ("X", "Y")) + "print('openjd_env: X=message')\n"),
                    "onExit": python_action(dump_code("exit", ("X", "Y"))),
                }
            },
        }
    )

    identifier = session.enter_environment(environment=env)
    assert recorder.wait_final().state == ActionState.SUCCESS
    run_ok(recorder, session.run_task, step_script=dump_step("task", "X", "Y"), task_parameter_values={})
    run_ok(recorder, session.exit_environment, identifier=identifier, keep_session_running=True)
    run_ok(recorder, session.run_task, step_script=dump_step("after", "X", "Y"), task_parameter_values={})

    assert seen(session, "enter") == {"X": "declared", "Y": "declared"}
    assert seen(session, "task") == {"X": "message", "Y": "declared"}
    assert seen(session, "exit") == {"X": "message", "Y": "declared"}
    assert seen(session, "after") == {"X": None, "Y": None}


def test_later_environment_wins(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    outer = environment({"name": "Outer", "variables": {"X": "outer", "OUTER": "o"}})
    inner = printing_environment("Inner", "openjd_env: X=inner")

    session.enter_environment(environment=outer)
    recorder.wait_final()
    session.enter_environment(environment=inner)
    recorder.wait_final()
    run_ok(recorder, session.run_task, step_script=dump_step("both", "X", "OUTER"), task_parameter_values={})

    assert seen(session, "both") == {"X": "inner", "OUTER": "o"}


def test_variables_resolve_format_strings(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder, job_parameter_values=parameter_values(Quality="draft"))
    env = environment(
        {"name": "Formats", "variables": {"Q": "q={{Param.Quality}}", "WD": "{{Session.WorkingDirectory}}"}}
    )

    run_ok(recorder, session.enter_environment, environment=env)
    run_ok(recorder, session.run_task, step_script=dump_step("vars", "Q", "WD"), task_parameter_values={})

    assert seen(session, "vars") == {"Q": "q=draft", "WD": str(session.working_directory)}


def test_enter_exit_call_variables(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder, os_env_vars={"VIA": "session"})
    env = environment(
        {
            "name": "CallVars",
            "script": {
                "actions": {
                    "onEnter": python_action(dump_code("enter", ("VIA",))),
                    "onExit": python_action(dump_code("exit", ("VIA",))),
                }
            },
        }
    )

    identifier = session.enter_environment(environment=env, os_env_vars={"VIA": "enter-call"})
    assert recorder.wait_final().state == ActionState.SUCCESS
    run_ok(recorder, session.run_task, step_script=dump_step("task", "VIA"), task_parameter_values={})
    session.exit_environment(identifier=identifier, os_env_vars={"VIA": "exit-call"})
    assert recorder.wait_final().state == ActionState.SUCCESS

    assert seen(session, "enter") == {"VIA": "enter-call"}
    assert seen(session, "task") == {"VIA": "session"}
    assert seen(session, "exit") == {"VIA": "exit-call"}


def test_long_env_value_applied_whole(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    code = "print('openjd_env: LONG=' + 'v' * 99990 + 'END', flush=True)"
    env = environment({"name": "Long", "script": {"actions": {"onEnter": python_action(code)}}})

    session.enter_environment(environment=env)
    assert recorder.wait_final().state == ActionState.SUCCESS
    check = python_step("import os, sys; sys.exit(0 if os.environ['LONG'] == 'v' * 99990 + 'END' else 1)")

    # The check exits 1 unless the task received the whole value.
    run_ok(recorder, session.run_task, step_script=check, task_parameter_values={})


def test_huge_env_value_whole_or_failed(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    code = "print('openjd_env: HUGE=' + 'h' * 300000 + 'END', flush=True)"
    env = environment({"name": "Huge", "script": {"actions": {"onEnter": python_action(code)}}})

    session.enter_environment(environment=env)
    status = recorder.wait_final()

    if status.state == ActionState.FAILED:
        assert status.fail_message
        assert "HUGE" in status.fail_message
    else:
        assert status.state == ActionState.SUCCESS
        check = python_step("import os, sys; sys.exit(0 if os.environ['HUGE'] == 'h' * 300000 + 'END' else 1)")
        run_ok(recorder, session.run_task, step_script=check, task_parameter_values={})


def test_task_without_session_env(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder, os_env_vars={"FROM_SESSION": "s"})
    run_ok(
        recorder,
        session.enter_environment,
        environment=environment({"name": "E", "variables": {"FROM_ENV": "e"}}),
    )
    names = ("FROM_SESSION", "FROM_ENV", "FROM_CALL", "OPENJD_SESSION_WORKING_DIR")

    run_ok(
        recorder,
        session._run_task_without_session_env,
        step_script=dump_step("bare", *names),
        task_parameter_values={},
        os_env_vars={"FROM_CALL": "c"},
    )

    assert seen(session, "bare") == {
        "FROM_SESSION": "s",
        "FROM_ENV": None,
        "FROM_CALL": "c",
        "OPENJD_SESSION_WORKING_DIR": str(session.working_directory),
    }


# ----- exact values --------------------------------------------------------------------------

TRICKY_VALUES = {
    "CR": "a\rb",
    "CRLF": "a\r\nb",
    "QUOTES": 'it\'s "quoted"',
    "DOLLAR": "$HOME ${HOME} `id` $(id) \\$",
    "NEWLINES": "line1\nline2\n",
    "BACKSLASH": "a\\b\\",
    "UNICODE": "caf\u00e9 \u2713",
    "SPACES": "  lead and trail  ",
    "PERCENT": "100% %s %%",
    "EMPTY": "",
}


def test_call_values_passed_exactly(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)

    run_ok(
        recorder,
        session.run_task,
        step_script=dump_step("call", *TRICKY_VALUES),
        task_parameter_values={},
        os_env_vars=TRICKY_VALUES,
    )

    assert seen(session, "call") == TRICKY_VALUES


def test_constructor_values_passed_exactly(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder, os_env_vars=TRICKY_VALUES)

    run_ok(
        recorder,
        session.run_subprocess,
        command=PYTHON,
        args=["-c", dump_code("constructor", tuple(TRICKY_VALUES))],
    )

    assert seen(session, "constructor") == TRICKY_VALUES


def test_declared_values_passed_exactly(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    run_ok(
        recorder,
        session.enter_environment,
        environment=environment({"name": "Tricky", "variables": TRICKY_VALUES}),
    )

    run_ok(recorder, session.run_task, step_script=dump_step("declared", *TRICKY_VALUES), task_parameter_values={})

    assert seen(session, "declared") == TRICKY_VALUES


def test_message_values_passed_exactly(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    lines = ["openjd_env: " + json.dumps(f"{name}={value}") for name, value in TRICKY_VALUES.items()]
    session.enter_environment(environment=printing_environment("Json", *lines))
    assert recorder.wait_final().state == ActionState.SUCCESS

    run_ok(recorder, session.run_task, step_script=dump_step("messages", *TRICKY_VALUES), task_parameter_values={})

    assert seen(session, "messages") == TRICKY_VALUES


def test_plain_env_message_forms(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    lines = [
        "openjd_env: FOO=bar",
        "openjd_env: A=x=y",
        "openjd_env: B=",
        "openjd_env:  Q=lead",
        "openjd_env: T=trailing  ",
        'openjd_env: "J=json\\tval"',
        'openjd_env: "K=spaced"  ',
    ]
    session.enter_environment(environment=printing_environment("Forms", *lines))
    assert recorder.wait_final().state == ActionState.SUCCESS

    run_ok(
        recorder,
        session.run_task,
        step_script=dump_step("forms", "FOO", "A", "B", "Q", "T", "J", "K"),
        task_parameter_values={},
    )

    assert seen(session, "forms") == {
        "FOO": "bar",
        "A": "x=y",
        "B": "",
        "Q": "lead",
        "T": "trailing  ",
        "J": "json\tval",
        "K": "spaced",
    }


@pytest.mark.parametrize("name", ["A-B", "1ABC", "", "WITH SPACE", "A=B"])
def test_invalid_variable_name_rejected(make_session: SessionFactory, name: str) -> None:
    session = make_session()

    with pytest.raises(ValueError, match=re.escape(repr(name))):
        session.run_task(step_script=dump_step("x", "A"), task_parameter_values={}, os_env_vars={name: "1"})
    assert session.state == SessionState.READY
    with pytest.raises(ValueError, match=re.escape(repr(name))):
        make_session(os_env_vars={name: "1"})


# ----- environment messages outside environments ----------------------------------------------


def test_env_message_in_task_ignored(make_session: SessionFactory, logs: LogCollector) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder, os_env_vars={"KEEP": "k"})
    leaking = python_step("print('openjd_env: LEAK=1'); print('openjd_unset_env: KEEP')")

    run_ok(recorder, session.run_task, step_script=leaking, task_parameter_values={})
    run_ok(recorder, session.run_task, step_script=dump_step("next", "LEAK", "KEEP"), task_parameter_values={})

    assert seen(session, "next") == {"LEAK": None, "KEEP": "k"}
    warnings = [entry for entry in logs.snapshot(session_id_of(session)) if entry.levelname == "WARNING"]
    assert len(warnings) == 2
    assert "openjd_env: LEAK=1" in logs.messages()


def test_exit_env_message_not_applied(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    env = environment({"name": "Late", "script": {"actions": {"onExit": python_action("print('openjd_env: LATE=1')")}}})
    identifier = session.enter_environment(environment=env)
    recorder.wait_final()

    run_ok(recorder, session.exit_environment, identifier=identifier, keep_session_running=True)
    run_ok(recorder, session.run_task, step_script=dump_step("after", "LATE"), task_parameter_values={})

    assert seen(session, "after") == {"LATE": None}


# ----- malformed environment messages ---------------------------------------------------------

MALFORMED_ENV_LINES = [
    "openjd_env: 1FOO=bar",
    "openjd_env: FOO",
    "openjd_env: FOO bar=1",
    "openjd_env: HAS-DASH=x",
    'openjd_env: "FOO=unterminated',
    'openjd_env: "FOO=x" trailing',
    "openjd_unset_env: TWO WORDS",
    "openjd_unset_env: TRAILING ",
    "openjd_redacted_env: NO_EQUALS_SIGN",
    "openjd_redacted_env: 1BAD=secret",
    "Openjd_env: X=1",
    " openjd_env: X=1",
    "openjd_env:X=1",
    "OPENJD_UNSET_ENV: X",
]


@pytest.mark.parametrize("line", MALFORMED_ENV_LINES)
def test_malformed_env_message_fails_enter(make_session: SessionFactory, logs: LogCollector, line: str) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    code = f"import time\nprint('openjd_env: GOOD=fine', flush=True)\nprint({line!r}, flush=True)\ntime.sleep(30)\n"
    env = environment({"name": "Bad", "script": {"actions": {"onEnter": python_action(code)}}})

    identifier = session.enter_environment(environment=env)
    status = recorder.wait_final()

    assert status.state == ActionState.FAILED
    assert status.exit_code == -9
    assert status.fail_message
    assert session.state == SessionState.READY_ENDING
    assert session.environments_entered == (identifier,)
    annotated = [entry for entry in logs.snapshot(session_id_of(session)) if " -- ERROR: " in entry.message]
    assert len(annotated) == 1
    # The message keeps the printed kind (a redacted value is masked).
    assert annotated[0].message.startswith(line.split(":")[0] + ":")


@pytest.mark.parametrize("line", ["openjd_env: 1FOO=bar", "openjd_unset_env: TWO WORDS", "Openjd_env: X=1"])
def test_malformed_env_message_in_task(make_session: SessionFactory, logs: LogCollector, line: str) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)

    session.run_task(step_script=python_step(f"print({line!r})"), task_parameter_values={})
    status = recorder.wait_final()

    assert status.state == ActionState.SUCCESS
    assert status.exit_code == 0
    assert any(message.startswith(f"{line} -- ERROR: ") for message in logs.messages())


def test_env_prose_is_plain_output(make_session: SessionFactory, logs: LogCollector) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)

    session.enter_environment(environment=printing_environment("Prose", "openjd_environment is ready"))
    status = recorder.wait_final()

    assert status.state == ActionState.SUCCESS
    assert status.fail_message is None
    assert "openjd_environment is ready" in logs.messages()
