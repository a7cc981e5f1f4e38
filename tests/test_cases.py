"""Regression cases from reported problems with running Open Job Description sessions.

Each test runs one job template from ``tests/data/cases/`` through the public API and
checks the behaviour the report asked for. The job parameter ``Py`` is this interpreter.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import pytest
from helpers import (
    PYTHON,
    CallbackRecorder,
    LogCollector,
    SessionFactory,
    build_job,
    find_environment,
    find_step_script,
    kill_quietly,
    parameter_values,
    pid_alive,
    session_id_of,
    wait_for_file,
    wait_until,
)
from openjd.model import Job, RevisionExtensions, SpecificationRevision, StepParameterSpaceIterator

from openjd.sessions import ActionState, ActionStatus, Session, SessionState

pytestmark = pytest.mark.skipif(os.name != "posix", reason="runs POSIX processes and signals")

CASES = Path(__file__).parent / "data" / "cases"


@pytest.fixture
def make_session(tmp_path: Path) -> Iterator[SessionFactory]:
    factory = SessionFactory(tmp_path)
    yield factory
    factory.close()


@pytest.fixture
def logs() -> Iterator[LogCollector]:
    with LogCollector().attached() as collector:
        yield collector


def case_job(name: str, *, with_python: bool = True, **parameters: str) -> tuple[Job, Any]:
    template = (CASES / f"{name}.yaml").read_text()
    if with_python:
        parameters["Py"] = PYTHON
    return build_job(template, parameters)


def extensions(*names: str) -> RevisionExtensions:
    return RevisionExtensions(spec_rev=SpecificationRevision.v2023_09, supported_extensions=list(names))


def run(recorder: CallbackRecorder, start: Any, **kwargs: Any) -> ActionStatus:
    """Call ``start(**kwargs)`` and return the final status of the action it starts."""
    start(**kwargs)
    return recorder.wait_final()


def read_json(session: Session, name: str) -> Any:
    return json.loads((session.working_directory / name).read_text())


def test_multiline_json_env_value(make_session: SessionFactory) -> None:
    job, values = case_job("001-env-multiline-json")
    recorder = CallbackRecorder()
    session = make_session(job_parameter_values=values, callback=recorder)

    enter = run(recorder, session.enter_environment, environment=find_environment(job, "Publisher"))
    task = run(recorder, session.run_task, step_script=find_step_script(job), task_parameter_values={})

    assert enter.state == ActionState.SUCCESS
    assert task.state == ActionState.SUCCESS
    assert read_json(session, "seen.json") == {"TWO_LINES": "alpha\nbeta", "WITH_EQUALS": "k1=v1;k2=v2"}


def test_empty_env_values_defined(make_session: SessionFactory, logs: LogCollector) -> None:
    job, values = case_job("002-env-empty-value")
    recorder = CallbackRecorder()
    session = make_session(job_parameter_values=values, callback=recorder, os_env_vars={"HOST_PROVIDED": "from-host"})

    enter = run(recorder, session.enter_environment, environment=find_environment(job, "Blanker"))
    task = run(recorder, session.run_task, step_script=find_step_script(job), task_parameter_values={})

    assert enter == ActionStatus(state=ActionState.SUCCESS, exit_code=0)
    assert task.state == ActionState.SUCCESS
    assert read_json(session, "seen.json") == {"EMPTY_PLAIN": "", "EMPTY_QUOTED": "", "HOST_PROVIDED": ""}
    assert not [entry for entry in logs.snapshot(session_id_of(session)) if entry.levelname != "INFO"]


@pytest.mark.parametrize(
    "line",
    [
        "openjd_env: 1LEADING_DIGIT=x",
        "openjd_env: NO_EQUALS_SIGN",
        "openjd_env: HAS-DASH=x",
        'openjd_env: "UNTERMINATED=abc',
        "openjd_unset_env: TWO WORDS",
    ],
)
def test_malformed_env_fails_action(make_session: SessionFactory, line: str) -> None:
    job, values = case_job("003-env-malformed-fails-action", Line=line)
    recorder = CallbackRecorder()
    session = make_session(job_parameter_values=values, callback=recorder)

    status = run(recorder, session.enter_environment, environment=find_environment(job, "Emitter"))

    assert status.state == ActionState.FAILED
    assert session.state == SessionState.READY_ENDING


def test_non_utf8_output_drained(make_session: SessionFactory, logs: LogCollector) -> None:
    job, values = case_job("005-non-utf8-output")
    recorder = CallbackRecorder()
    session = make_session(job_parameter_values=values, callback=recorder)

    status = run(recorder, session.run_task, step_script=find_step_script(job), task_parameter_values={})

    assert status.state == ActionState.SUCCESS
    assert status.progress == 50.0
    messages = logs.messages(session_id_of(session))
    assert "line-after-bad-byte" in messages
    assert any(message.startswith("legacy encoded ") and message.endswith(" dash") for message in messages)
    assert len([message for message in messages if message.startswith("filler line ")]) == 3000


@pytest.mark.slow
def test_background_child_keeps_stdout(make_session: SessionFactory, logs: LogCollector) -> None:
    job, values = case_job("006-background-child-keeps-stdout")
    recorder = CallbackRecorder()
    session = make_session(job_parameter_values=values, callback=recorder)
    pid_file = session.working_directory / "helper.pid"

    session.run_task(step_script=find_step_script(job), task_parameter_values={})
    helper = int(wait_for_file(pid_file))
    try:
        # The helper sleeps 45 s, longer than the hang guard of wait_final, so an action
        # that waited for the helper's end would fail here.
        status = recorder.wait_final()
    finally:
        kill_quietly([helper])

    assert status == ActionStatus(state=ActionState.SUCCESS, exit_code=0)
    assert "launcher finished its own work" in logs.messages(session_id_of(session))


def test_exit_env_after_task_failure(make_session: SessionFactory) -> None:
    job, values = case_job("007-exit-env-after-task-failure")
    recorder = CallbackRecorder()
    session = make_session(job_parameter_values=values, callback=recorder)
    script = find_step_script(job)

    identifier = session.enter_environment(environment=find_environment(job, "Scratch"))
    assert recorder.wait_final().state == ActionState.SUCCESS
    task = run(recorder, session.run_task, step_script=script, task_parameter_values={})

    assert task.state == ActionState.FAILED
    assert task.exit_code == 3
    assert session.state == SessionState.READY_ENDING
    with pytest.raises(RuntimeError):
        session.run_task(step_script=script, task_parameter_values={})

    exit_status = run(recorder, session.exit_environment, identifier=identifier)
    assert exit_status.state == ActionState.SUCCESS
    assert read_json(session, "onexit.json") == {
        "SCRATCH_TAG": "declared-in-variables",
        "SCRATCH_TOKEN": "set-by-onenter",
    }


@pytest.mark.parametrize(("code", "state"), [(0, ActionState.SUCCESS), (4, ActionState.FAILED)])
def test_status_fail_progress_messages(make_session: SessionFactory, code: int, state: ActionState) -> None:
    job, values = case_job("008-status-fail-progress-messages", Code=str(code))
    recorder = CallbackRecorder()
    session = make_session(job_parameter_values=values, callback=recorder)

    status = run(recorder, session.run_task, step_script=find_step_script(job), task_parameter_values={})

    assert status == ActionStatus(
        state=state,
        progress=12.5,
        status_message="rendering: pass 2/3",
        fail_message="texture server unreachable",
        exit_code=code,
    )
    assert any(update.status_message == "loading assets" for update in recorder.statuses)


@pytest.mark.slow
def test_action_timeout_state(make_session: SessionFactory) -> None:
    job, values = case_job("009-action-timeout-state")
    recorder = CallbackRecorder()
    session = make_session(job_parameter_values=values, callback=recorder)

    session.run_task(step_script=find_step_script(job), task_parameter_values={})
    pid = int(wait_for_file(session.working_directory / "slow.pid"))
    try:
        status = recorder.wait_final()
        assert status.state == ActionState.TIMEOUT
        assert wait_until(lambda: not pid_alive(pid), 5)
        assert session.state == SessionState.READY_ENDING
    finally:
        kill_quietly([pid])


def test_cancel_kills_descendants(make_session: SessionFactory) -> None:
    job, values = case_job("010-cancel-kills-descendants")
    recorder = CallbackRecorder()
    session = make_session(job_parameter_values=values, callback=recorder)

    session.run_task(step_script=find_step_script(job), task_parameter_values={})
    pids = json.loads(wait_for_file(session.working_directory / "pids.json"))
    try:
        session.cancel_action()
        assert recorder.wait_final().state == ActionState.CANCELED
        assert wait_until(lambda: not any(pid_alive(pid) for pid in pids.values()), 5)
    finally:
        kill_quietly(list(pids.values()))


def run_notify_case(
    make_session: SessionFactory, logs: LogCollector, behaviour: str, time_limit: Optional[timedelta] = None
) -> tuple[Session, ActionStatus, list[str]]:
    job, values = case_job("012-notify-then-terminate", Behaviour=behaviour)
    recorder = CallbackRecorder()
    session = make_session(job_parameter_values=values, callback=recorder)
    session.run_task(step_script=find_step_script(job), task_parameter_values={})
    pid = int(wait_for_file(session.working_directory / "started.txt"))
    try:
        session.cancel_action(time_limit=time_limit)
        status = recorder.wait_final()
    finally:
        kill_quietly([pid])
    return session, status, logs.messages(session_id_of(session))


def test_notify_graceful_exit_early(make_session: SessionFactory, logs: LogCollector) -> None:
    session, status, messages = run_notify_case(make_session, logs, "graceful")

    assert (session.working_directory / "graceful.txt").read_text() == "checkpoint saved"
    assert status == ActionStatus(state=ActionState.CANCELED, exit_code=0)
    assert "saved checkpoint, exiting" in messages
    # The process ended on its own: the notify period was not waited out.
    assert not any(message.startswith("Notify period ended") for message in messages)
    assert not any(message.startswith('INTERRUPT: Sending signal "kill"') for message in messages)


@pytest.mark.slow
def test_notify_stubborn_killed_after_period(make_session: SessionFactory, logs: LogCollector) -> None:
    session, status, messages = run_notify_case(make_session, logs, "stubborn")

    assert status == ActionStatus(state=ActionState.CANCELED, exit_code=-9)
    assert "ignoring notify" in messages
    ended = [m for m in messages if m.startswith("Notify period ended")]
    assert len(ended) == 1
    assert messages.index("ignoring notify") < messages.index(ended[0])
    notify_end = read_json(session, "cancel_info.json")["NotifyEnd"]
    assert f"Grace period ends at {notify_end}" in messages


def test_notify_zero_time_limit_immediate(make_session: SessionFactory, logs: LogCollector) -> None:
    session, status, messages = run_notify_case(make_session, logs, "stubborn", timedelta(0))

    assert status == ActionStatus(state=ActionState.CANCELED, exit_code=-9)
    assert "ignoring notify" not in messages
    assert not any(message.startswith("Notify period ended") for message in messages)


def test_command_not_found_named(make_session: SessionFactory, logs: LogCollector) -> None:
    job, values = case_job("013-command-not-found", with_python=False)
    recorder = CallbackRecorder()
    session = make_session(job_parameter_values=values, callback=recorder)

    session.run_task(step_script=find_step_script(job), task_parameter_values={})
    status = recorder.wait_final()

    assert status.state == ActionState.FAILED
    text = logs.text()
    assert "no-such-renderer-zq81" in text
    assert "Running command None" not in text


def test_redacted_env_secret_hidden(make_session: SessionFactory, logs: LogCollector) -> None:
    job, values = case_job("014-redacted-env")
    recorder = CallbackRecorder()
    session = make_session(
        job_parameter_values=values, callback=recorder, revision_extensions=extensions("REDACTED_ENV_VARS")
    )

    enter = run(recorder, session.enter_environment, environment=find_environment(job, "Credentials"))
    task = run(recorder, session.run_task, step_script=find_step_script(job), task_parameter_values={})

    assert enter.state == ActionState.SUCCESS
    assert task.state == ActionState.SUCCESS
    assert (session.working_directory / "key.txt").read_text() == "Zq7-plum-ORBIT-4411"
    assert (session.working_directory / "db.txt").read_text() == 'mx"9 walrus'
    text = logs.text()
    assert "Zq7-plum-ORBIT-4411" not in text
    assert 'mx"9 walrus' not in text
    assert "debug: license key is ******** (len 19)" in logs.messages(session_id_of(session))


def test_session_root_directory(make_session: SessionFactory, tmp_path: Path) -> None:
    job, values = case_job("016-session-root-directory")
    recorder = CallbackRecorder()
    session = make_session(job_parameter_values=values, callback=recorder)
    working_directory = session.working_directory

    assert working_directory.parent == tmp_path.resolve()
    assert session.files_directory.parent == working_directory
    status = run(recorder, session.run_task, step_script=find_step_script(job), task_parameter_values={})
    assert status.state == ActionState.SUCCESS
    assert (working_directory / "out" / "deep" / "er" / "f19.bin").stat().st_size == 1024

    session.cleanup()
    assert not working_directory.exists()
    assert tmp_path.is_dir()

    retained = make_session(job_parameter_values=values, retain_working_dir=True)
    retained.cleanup()
    assert retained.working_directory.is_dir()

    with pytest.raises(RuntimeError):
        make_session(job_parameter_values=values, session_root_directory=tmp_path / "does-not-exist")


def test_embedded_file_eol_modes(make_session: SessionFactory) -> None:
    job, values = case_job("017-embedded-file-eol-mode")
    recorder = CallbackRecorder()
    session = make_session(
        job_parameter_values=values, callback=recorder, revision_extensions=extensions("FEATURE_BUNDLE_1")
    )

    status = run(recorder, session.run_task, step_script=find_step_script(job, "Inspect"), task_parameter_values={})

    assert status.state == ActionState.SUCCESS
    info = read_json(session, "files.json")
    raw = {label: bytes.fromhex(entry["hex"]) for label, entry in info.items() if "hex" in entry}
    assert raw["crlf"] == b"one\r\ntwo\r\n"
    assert raw["lf"] == b"three\nfour\n"
    assert raw["auto"] == b"five\nsix\n"
    assert raw["unicode"] == "caf\u00e9 \u2713 \u65e5\u672c\n".encode()
    assert os.path.basename(info["self"]["path"]) == "inspect_files.py"
    assert os.path.basename(info["unicode"]["path"]) == "notes.txt"
    assert info["self"]["mode"] & stat.S_IXUSR
    assert not info["lf"]["mode"] & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def test_task_chunking_frames(make_session: SessionFactory, logs: LogCollector) -> None:
    job, values = case_job("019-task-chunking")
    recorder = CallbackRecorder()
    session = make_session(
        job_parameter_values=values, callback=recorder, revision_extensions=extensions("TASK_CHUNKING")
    )
    step = job.steps[0]
    chunks = list(StepParameterSpaceIterator(space=step.parameterSpace))

    for task_values in chunks:
        status = run(recorder, session.run_task, step_script=step.script, task_parameter_values=task_values)
        assert status == ActionStatus(state=ActionState.SUCCESS, progress=100.0, exit_code=0)

    assert [task_values["Frame"].value for task_values in chunks] == ["1-4", "5-7", "8-10"]
    rows = (session.working_directory / "frames.txt").read_text().split()
    assert rows == ["1-4=1,2,3,4", "5-7=5,6,7", "8-10=8,9,10"]
    assert "Frame(CHUNK[INT]) = 5-7" in logs.messages(session_id_of(session))


def test_nested_env_set_unset(make_session: SessionFactory) -> None:
    job, values = case_job("021-nested-env-set-unset-restore")
    recorder = CallbackRecorder()
    session = make_session(
        job_parameter_values=values, callback=recorder, os_env_vars={"LAYER": "session", "DROP": "keep-me"}
    )
    probe = find_step_script(job)

    def probe_as(label: str, **kwargs: Any) -> None:
        task_values = parameter_values(Label=label)
        status = run(recorder, session.run_task, step_script=probe, task_parameter_values=task_values, **kwargs)
        assert status.state == ActionState.SUCCESS

    outer = session.enter_environment(environment=find_environment(job, "Outer"))
    assert recorder.wait_final().state == ActionState.SUCCESS
    inner = session.enter_environment(environment=find_environment(job, "Inner"))
    assert recorder.wait_final().state == ActionState.SUCCESS
    probe_as("both")
    probe_as("both-with-action-vars", os_env_vars={"LAYER": "action", "ACTION_ONLY": "a"})
    assert run(recorder, session.exit_environment, identifier=inner, keep_session_running=True).state == (
        ActionState.SUCCESS
    )
    probe_as("outer-only")
    assert run(recorder, session.exit_environment, identifier=outer, keep_session_running=True).state == (
        ActionState.SUCCESS
    )
    probe_as("none")

    unset = {"DROP": None, "ONLY_OUTER": None}
    assert read_json(session, "both.json") == {"LAYER": "inner", **unset, "ACTION_ONLY": None}
    assert read_json(session, "both-with-action-vars.json") == {"LAYER": "inner", **unset, "ACTION_ONLY": "a"}
    assert read_json(session, "inner-onexit.json") == {"LAYER": "inner", **unset, "ACTION_ONLY": None}
    assert read_json(session, "outer-only.json") == {
        "LAYER": "outer",
        "DROP": "keep-me",
        "ONLY_OUTER": "yes",
        "ACTION_ONLY": None,
    }
    assert read_json(session, "none.json") == {
        "LAYER": "session",
        "DROP": "keep-me",
        "ONLY_OUTER": None,
        "ACTION_ONLY": None,
    }
