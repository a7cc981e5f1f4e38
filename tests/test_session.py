"""Session lifecycle: states, allowed calls, the environment stack, callbacks and cleanup."""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import (
    CallbackRecorder,
    LogCollector,
    SessionFactory,
    environment,
    pid_alive,
    python_action,
    python_step,
    session_id_of,
    shell_step,
    step_script,
    wait_for_file,
    wait_until,
)
from openjd.model import RevisionExtensions, SpecificationRevision

from openjd.sessions import ActionState, ActionStatus, Session, SessionState

pytestmark = pytest.mark.skipif(os.name != "posix", reason="runs POSIX processes and signals")

READY_ONLY_ENTER = "Session must be in the READY state to enter an Environment."
READY_ONLY_TASK = "Session must be in the READY state to run a task."
READY_ONLY_EXIT = "Session must be in the READY or READY_ENDING state to exit an Environment."
NOTHING_RUNNING = "No actions are running"

# Writes ready.txt once it runs, so that a test can cancel a process that has surely started.
SLEEP_CODE = "import time; open('ready.txt', 'w').write('yes'); time.sleep(60)"
SLEEP_STEP = python_step(SLEEP_CODE)
QUICK_STEP = python_step("print('done')")
FAILING_STEP = python_step("import sys; sys.exit(3)")
EMPTY_ENVIRONMENT = environment({"name": "Empty", "variables": {"EMPTY_MARK": "1"}})


@pytest.fixture
def make_session(tmp_path: Path) -> Iterator[SessionFactory]:
    factory = SessionFactory(tmp_path)
    yield factory
    factory.close()


@pytest.fixture
def logs() -> Iterator[LogCollector]:
    with LogCollector().attached() as collector:
        yield collector


def subprocess_message(state: str) -> str:
    return f"Session must be in the READY state to run a subprocess. Current state: {state}"


def assert_start_methods_rejected(session: Session, state_value: str) -> None:
    """Check that every method that starts a new action (not exits) raises for ``session``."""
    with pytest.raises(RuntimeError, match=f"^{re.escape(READY_ONLY_ENTER)}$"):
        session.enter_environment(environment=EMPTY_ENVIRONMENT)
    with pytest.raises(RuntimeError, match=f"^{re.escape(READY_ONLY_TASK)}$"):
        session.run_task(step_script=QUICK_STEP, task_parameter_values={})
    with pytest.raises(RuntimeError, match=f"^{re.escape(READY_ONLY_TASK)}$"):
        session._run_task_without_session_env(step_script=QUICK_STEP, task_parameter_values={})
    with pytest.raises(RuntimeError, match=f"^{re.escape(subprocess_message(state_value))}$"):
        session.run_subprocess(command="true")


# ----- construction ------------------------------------------------------------------------


def test_new_session_is_ready(make_session: SessionFactory, tmp_path: Path) -> None:
    session = make_session(session_id="fresh")

    assert session.state == SessionState.READY
    assert session.action_status is None
    assert session.environments_entered == ()
    assert session.working_directory.parent == tmp_path.resolve()
    assert session.working_directory.name.startswith("fresh")
    assert session.working_directory.is_dir()
    assert session.files_directory.parent == session.working_directory
    assert session.files_directory.name.startswith("embedded_files")


def test_missing_root_directory_rejected(tmp_path: Path, logs: LogCollector) -> None:
    missing = tmp_path / "missing"

    with pytest.raises(RuntimeError) as raised:
        Session(session_id="s", job_parameter_values={}, session_root_directory=missing)

    assert str(raised.value) == f"Ensure that the root directory ({missing}) exists and is a directory."
    assert logs.snapshot() == []


def test_enabled_extensions_listed(make_session: SessionFactory) -> None:
    extensions = RevisionExtensions(
        spec_rev=SpecificationRevision.v2023_09, supported_extensions=["TASK_CHUNKING", "REDACTED_ENV_VARS"]
    )
    session = make_session(revision_extensions=extensions)

    assert sorted(session.get_enabled_extensions()) == ["REDACTED_ENV_VARS", "TASK_CHUNKING"]
    assert make_session().get_enabled_extensions() == []


# ----- the state table -----------------------------------------------------------------------


def test_ready_state_rejects_cancel(make_session: SessionFactory) -> None:
    session = make_session()

    with pytest.raises(RuntimeError, match=f"^{NOTHING_RUNNING}$"):
        session.cancel_action()
    assert session.state == SessionState.READY


def test_running_state_allowed_calls(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    identifier = session.enter_environment(environment=EMPTY_ENVIRONMENT)
    recorder.wait_final()
    session.run_task(step_script=SLEEP_STEP, task_parameter_values={})

    assert session.state == SessionState.RUNNING
    wait_for_file(session.working_directory / "ready.txt")
    assert_start_methods_rejected(session, "running")
    with pytest.raises(RuntimeError, match=f"^{re.escape(READY_ONLY_EXIT)}$"):
        session.exit_environment(identifier=identifier)
    assert session.state == SessionState.RUNNING

    session.cancel_action()
    assert recorder.wait_final().state == ActionState.CANCELED
    assert session.state == SessionState.READY_ENDING


def test_ready_ending_state_allowed_calls(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    identifier = session.enter_environment(environment=EMPTY_ENVIRONMENT)
    recorder.wait_final()
    session.run_task(step_script=FAILING_STEP, task_parameter_values={})
    assert recorder.wait_final().state == ActionState.FAILED

    assert session.state == SessionState.READY_ENDING
    assert_start_methods_rejected(session, "ready_ending")
    with pytest.raises(RuntimeError, match=f"^{NOTHING_RUNNING}$"):
        session.cancel_action()

    session.exit_environment(identifier=identifier)
    assert recorder.wait_final().state == ActionState.SUCCESS
    assert session.state == SessionState.READY_ENDING
    assert session.environments_entered == ()


def test_ended_state_rejects_everything(make_session: SessionFactory, logs: LogCollector) -> None:
    session = make_session()
    identifier = session.enter_environment(environment=EMPTY_ENVIRONMENT)
    session.cleanup()

    assert session.state == SessionState.ENDED
    assert_start_methods_rejected(session, "ended")
    with pytest.raises(RuntimeError, match=f"^{re.escape(READY_ONLY_EXIT)}$"):
        session.exit_environment(identifier=identifier)
    with pytest.raises(RuntimeError, match=f"^{NOTHING_RUNNING}$"):
        session.cancel_action()

    logs.clear()
    session.cleanup()
    assert session.state == SessionState.ENDED
    assert logs.snapshot() == []


def test_failed_start_keeps_session_ready(make_session: SessionFactory) -> None:
    session = make_session()

    with pytest.raises(ValueError, match="^timeout must be a positive integer$"):
        session.run_subprocess(command="true", timeout=0)
    with pytest.raises(ValueError, match="^command must be a non-empty string$"):
        session.run_subprocess(command="  ")

    assert session.state == SessionState.READY


# ----- the environment stack -----------------------------------------------------------------


def test_default_identifier_format(make_session: SessionFactory) -> None:
    session = make_session(session_id="stack")

    identifier = session.enter_environment(environment=EMPTY_ENVIRONMENT)

    assert re.fullmatch(r"stack:[0-9a-f]{32}", identifier)
    assert session.environments_entered == (identifier,)


def test_duplicate_identifier_rejected(make_session: SessionFactory) -> None:
    session = make_session()
    session.enter_environment(environment=EMPTY_ENVIRONMENT, identifier="env-a")

    with pytest.raises(RuntimeError, match="^Environment env-a has already been entered in this Session.$"):
        session.enter_environment(environment=EMPTY_ENVIRONMENT, identifier="env-a")
    assert session.environments_entered == ("env-a",)


def test_identifier_reusable_after_exit(make_session: SessionFactory) -> None:
    session = make_session()
    session.enter_environment(environment=EMPTY_ENVIRONMENT, identifier="env-a")
    session.exit_environment(identifier="env-a", keep_session_running=True)

    assert session.enter_environment(environment=EMPTY_ENVIRONMENT, identifier="env-a") == "env-a"
    assert session.environments_entered == ("env-a",)


def test_exit_unknown_identifier_rejected(make_session: SessionFactory) -> None:
    session = make_session()
    session.enter_environment(environment=EMPTY_ENVIRONMENT, identifier="known")

    with pytest.raises(RuntimeError, match="^Cannot exit unknown Environment with identifier other$"):
        session.exit_environment(identifier="other")
    assert session.state == SessionState.READY


def test_exit_out_of_order_rejected(make_session: SessionFactory) -> None:
    session = make_session()
    session.enter_environment(environment=EMPTY_ENVIRONMENT, identifier="outer")
    session.enter_environment(environment=EMPTY_ENVIRONMENT, identifier="inner")

    with pytest.raises(RuntimeError, match="^Cannot exit Environment outer. Must exit Environment inner first.$"):
        session.exit_environment(identifier="outer")

    session.exit_environment(identifier="inner", keep_session_running=True)
    session.exit_environment(identifier="outer", keep_session_running=True)
    assert session.environments_entered == ()
    assert session.state == SessionState.READY


def test_keep_session_running_returns_ready(make_session: SessionFactory) -> None:
    session = make_session()
    session.enter_environment(environment=EMPTY_ENVIRONMENT, identifier="a")

    session.exit_environment(identifier="a", keep_session_running=True)

    assert session.state == SessionState.READY


def test_exit_without_keep_ends_session(make_session: SessionFactory) -> None:
    session = make_session()
    session.enter_environment(environment=EMPTY_ENVIRONMENT, identifier="outer")
    session.enter_environment(environment=EMPTY_ENVIRONMENT, identifier="inner")

    session.exit_environment(identifier="inner")
    assert session.state == SessionState.READY_ENDING

    # The ending-only mode is never cleared, even by a later exit that requests to keep running.
    session.exit_environment(identifier="outer", keep_session_running=True)
    assert session.state == SessionState.READY_ENDING


def test_failed_enter_stays_entered(make_session: SessionFactory, tmp_path: Path) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    failing = environment(
        {
            "name": "Broken",
            "script": {
                "actions": {
                    "onEnter": python_action("import sys; sys.exit(5)"),
                    "onExit": python_action("open('exited.txt', 'w').write('yes')"),
                }
            },
        }
    )

    identifier = session.enter_environment(environment=failing)
    status = recorder.wait_final()

    assert status.state == ActionState.FAILED
    assert status.exit_code == 5
    assert session.state == SessionState.READY_ENDING
    assert session.environments_entered == (identifier,)

    session.exit_environment(identifier=identifier)
    assert recorder.wait_final().state == ActionState.SUCCESS
    assert (session.working_directory / "exited.txt").read_text() == "yes"
    assert session.environments_entered == ()


def test_canceled_enter_stays_entered(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    slow = environment({"name": "Slow", "script": {"actions": {"onEnter": python_action(SLEEP_CODE)}}})

    identifier = session.enter_environment(environment=slow)
    wait_for_file(session.working_directory / "ready.txt")
    session.cancel_action()

    assert recorder.wait_final().state == ActionState.CANCELED
    assert session.environments_entered == (identifier,)
    assert session.state == SessionState.READY_ENDING


def test_unresolvable_variable_fails_enter(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    env = environment(
        {
            "name": "BadVariable",
            "variables": {"GOOD": "fine", "BAD": "{{Param.Missing}}"},
            "script": {"actions": {"onEnter": python_action("open('entered.txt', 'w').write('x')")}},
        }
    )

    identifier = session.enter_environment(environment=env)
    status = recorder.wait_final(timeout=1)

    assert status.state == ActionState.FAILED
    assert status.exit_code is None
    assert status.fail_message is not None
    assert "Param.Missing" in status.fail_message
    assert session.state == SessionState.READY_ENDING
    assert session.environments_entered == (identifier,)
    assert not (session.working_directory / "entered.txt").exists()

    session.exit_environment(identifier=identifier)
    assert recorder.wait_final().state == ActionState.SUCCESS
    assert session.environments_entered == ()


def test_environment_without_script_synchronous(make_session: SessionFactory, logs: LogCollector) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)

    identifier = session.enter_environment(environment=EMPTY_ENVIRONMENT)

    # The callback ran inside the method, on the calling thread, before it returned.
    assert recorder.calls == [
        (threading.current_thread().name, ActionStatus(state=ActionState.SUCCESS, exit_code=None))
    ]
    assert session.action_status == ActionStatus(state=ActionState.SUCCESS)
    assert session.state == SessionState.READY
    assert not any(message.startswith("Phase:") for message in logs.messages())

    recorder.clear()
    session.exit_environment(identifier=identifier, keep_session_running=True)
    assert recorder.states == [ActionState.SUCCESS]
    assert session.action_status == ActionStatus(state=ActionState.SUCCESS)


def test_environment_missing_action_synchronous(make_session: SessionFactory, logs: LogCollector) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    exit_only = environment({"name": "ExitOnly", "script": {"actions": {"onExit": python_action("pass")}}})

    session.enter_environment(environment=exit_only)

    assert recorder.calls == [(threading.current_thread().name, ActionStatus(state=ActionState.SUCCESS))]
    assert "Phase: Setup" not in logs.messages()


# ----- callbacks and action status -----------------------------------------------------------


def test_callback_order_running_first(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    step = python_step("print('openjd_progress: 50', flush=True); print('openjd_status: half', flush=True)")

    session.run_task(step_script=step, task_parameter_values={})
    final = recorder.wait_final()
    calls = list(recorder.calls)

    assert calls[0] == (threading.current_thread().name, ActionStatus(state=ActionState.RUNNING))
    assert calls[-1].status is final
    assert calls[-1].thread_name != threading.current_thread().name
    assert [call.status.state for call in calls[:-1]] == [ActionState.RUNNING] * (len(calls) - 1)
    assert [call.status.progress for call in calls] == [None, 50.0, 50.0, 50.0]
    assert final == ActionStatus(state=ActionState.SUCCESS, progress=50.0, status_message="half", exit_code=0)
    assert set(recorder.session_ids) == {session_id_of(session)}


def test_state_updated_before_final_callback(make_session: SessionFactory) -> None:
    seen: list[SessionState] = []
    holder: list[Session] = []

    def note_state(session_id: str, status: ActionStatus) -> None:
        if status.state != ActionState.RUNNING:
            seen.append(holder[0].state)

    recorder = CallbackRecorder(on_call=note_state)
    session = make_session(callback=recorder)
    holder.append(session)

    session.run_task(step_script=QUICK_STEP, task_parameter_values={})
    recorder.wait_final()
    session.run_task(step_script=FAILING_STEP, task_parameter_values={})
    recorder.wait_final()

    assert seen == [SessionState.READY, SessionState.READY_ENDING]


def test_action_status_reset_per_action(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    reporting = python_step(
        "print('openjd_progress: 40', flush=True)\n"
        "print('openjd_status: busy', flush=True)\n"
        "print('openjd_fail: oops', flush=True)"
    )

    session.run_task(step_script=reporting, task_parameter_values={})
    first = recorder.wait_final()
    assert first == ActionStatus(
        state=ActionState.SUCCESS, progress=40.0, status_message="busy", fail_message="oops", exit_code=0
    )
    assert session.action_status == first

    recorder.clear()
    session.run_task(step_script=QUICK_STEP, task_parameter_values={})
    second = recorder.wait_final()

    assert recorder.calls[0].status == ActionStatus(state=ActionState.RUNNING)
    assert second == ActionStatus(state=ActionState.SUCCESS, exit_code=0)
    assert session.action_status == second


def test_prelaunch_failure_callbacks(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    unresolvable = step_script({"actions": {"onRun": {"command": "{{Task.Param.Missing}}"}}})

    session.run_task(step_script=unresolvable, task_parameter_values={})

    # Everything happened inside run_task, on the calling thread.
    assert [call.thread_name for call in recorder.calls] == [threading.current_thread().name] * 2
    running, final = recorder.statuses
    assert running.state == ActionState.RUNNING
    assert running.fail_message
    assert final.state == ActionState.FAILED
    assert final.exit_code is None
    assert final.fail_message == running.fail_message
    assert "Task.Param.Missing" in final.fail_message
    assert session.state == SessionState.READY_ENDING


def test_callback_starts_next_action(make_session: SessionFactory) -> None:
    holder: list[Session] = []
    errors: list[BaseException] = []

    def chain(session_id: str, status: ActionStatus) -> None:
        if status.state == ActionState.SUCCESS and status.status_message == "first":
            try:
                holder[0].run_task(step_script=second_step, task_parameter_values={})
            except BaseException as err:  # noqa: BLE001 (reported by the assert below)
                errors.append(err)

    first_step = python_step("print('openjd_status: first')")
    second_step = python_step("print('openjd_status: second')")
    recorder = CallbackRecorder(on_call=chain)
    session = make_session(callback=recorder)
    holder.append(session)

    session.run_task(step_script=first_step, task_parameter_values={})
    assert recorder.wait_final().status_message == "first"
    second = recorder.wait_final()

    assert errors == []
    assert second.state == ActionState.SUCCESS
    assert second.status_message == "second"
    assert wait_until(lambda: session.state == SessionState.READY)


def test_failing_callback_logged(make_session: SessionFactory, logs: LogCollector) -> None:
    def explode(session_id: str, status: ActionStatus) -> None:
        raise KeyError("callback bug")

    recorder = CallbackRecorder(on_call=explode)
    session = make_session(callback=recorder)
    step = python_step("print('openjd_progress: 10'); print('after the progress line')")

    session.run_task(step_script=step, task_parameter_values={})
    final = recorder.wait_final()

    assert final.state == ActionState.SUCCESS
    assert final.progress == 10.0
    assert session.state == SessionState.READY
    assert "after the progress line" in logs.messages()
    errors = [record for record in logs.records if record.levelno == logging.ERROR]
    assert errors
    assert all(record.exc_info is not None for record in errors)
    assert all(getattr(record, "session_id", None) == session_id_of(session) for record in errors)


# ----- context manager and cleanup -----------------------------------------------------------


def test_context_manager_cleans_up(tmp_path: Path) -> None:
    with Session(session_id="ctx", job_parameter_values={}, session_root_directory=tmp_path) as session:
        assert session.state == SessionState.READY
        working_directory = session.working_directory

    assert session.state == SessionState.ENDED
    assert not working_directory.exists()


def test_context_manager_keeps_exception(tmp_path: Path) -> None:
    with pytest.raises(ZeroDivisionError):
        with Session(session_id="ctx", job_parameter_values={}, session_root_directory=tmp_path) as session:
            raise ZeroDivisionError

    assert session.state == SessionState.ENDED
    assert not session.working_directory.exists()


def test_cleanup_deletes_directory(make_session: SessionFactory, logs: LogCollector) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    session.run_task(step_script=shell_step("mkdir -p a/b && echo x > a/b/file"), task_parameter_values={})
    recorder.wait_final()
    logs.clear()

    session.cleanup()

    assert not session.working_directory.exists()
    assert session.working_directory.parent.is_dir()
    messages = logs.messages(session_id_of(session))
    assert messages[:4] == ["", "=" * 46, "--------- Session Cleanup", "=" * 46]
    assert f"Deleting working directory: {session.working_directory}" in messages


def test_cleanup_retains_directory(make_session: SessionFactory, logs: LogCollector) -> None:
    session = make_session(retain_working_dir=True)
    logs.clear()

    session.cleanup()
    session.cleanup()

    assert session.state == SessionState.ENDED
    assert session.working_directory.is_dir()
    assert "--------- Session Cleanup" not in logs.messages()


def test_cleanup_cancels_running_action(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    step = python_step("import os, time; open('pid.txt', 'w').write(str(os.getpid())); time.sleep(60)")
    session.run_task(step_script=step, task_parameter_values={})
    pid = int(wait_for_file(session.working_directory / "pid.txt"))

    session.cleanup()

    assert session.state == SessionState.ENDED
    assert not session.working_directory.exists()
    assert recorder.wait_final(timeout=1).state == ActionState.CANCELED
    assert wait_until(lambda: not pid_alive(pid), 5)
