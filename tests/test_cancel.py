"""Cancelation and runtime limits: methods, notify periods, cancel_info.json and final states."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    CallbackRecorder,
    LogCollector,
    SessionFactory,
    environment,
    kill_quietly,
    parameter_values,
    pid_alive,
    python_action,
    python_step,
    session_id_of,
    wait_for_file,
    wait_until,
)

from openjd.sessions import ActionState, ActionStatus, LogContent, Session, SessionState

pytestmark = pytest.mark.skipif(os.name != "posix", reason="runs POSIX processes and signals")

TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
NOTIFY = {"mode": "NOTIFY_THEN_TERMINATE"}

# A program that installs a SIGTERM handler, then writes pid.txt and waits. On SIGTERM it
# appends to term_count.txt. Then "graceful" copies cancel_info.json and exits 0, "exit7"
# exits 7, and "stubborn" keeps running.
TRAP_CODE = """\
import os, signal, sys, time
mode = {mode!r}
def on_term(signum, frame):
    with open('term_count.txt', 'a') as out:
        out.write('x')
    if mode == 'graceful':
        path = os.path.join(os.environ['OPENJD_SESSION_WORKING_DIR'], 'cancel_info.json')
        with open(path) as info, open('notified.json', 'w') as out:
            out.write(info.read())
        sys.exit(0)
    if mode == 'exit7':
        os._exit(7)
signal.signal(signal.SIGTERM, on_term)
with open('pid.txt', 'w') as out:
    out.write(str(os.getpid()))
print('ready', flush=True)
for _ in range(1200):
    time.sleep(0.05)
"""


@pytest.fixture
def make_session(tmp_path: Path) -> Iterator[SessionFactory]:
    factory = SessionFactory(tmp_path)
    yield factory
    factory.close()


@pytest.fixture
def logs() -> Iterator[LogCollector]:
    with LogCollector().attached() as collector:
        yield collector


def trap_action(mode: str, **fields: Any) -> dict[str, Any]:
    return python_action(TRAP_CODE.format(mode=mode), **fields)


def trap_step(mode: str, **fields: Any) -> Any:
    return python_step(TRAP_CODE.format(mode=mode), **fields)


def start_task(session: Session, script: Any) -> int:
    """Run ``script`` as a task and return its pid once its SIGTERM handler is installed."""
    session.run_task(step_script=script, task_parameter_values={})
    return int(wait_for_file(session.working_directory / "pid.txt"))


def term_count(session: Session) -> int:
    path = session.working_directory / "term_count.txt"
    return len(path.read_text()) if path.exists() else 0


def notify_end(session: Session) -> datetime:
    text = (session.working_directory / "cancel_info.json").read_text()
    match = re.fullmatch(r'\{"NotifyEnd": "(' + TIMESTAMP + r')"\}', text)
    assert match is not None, text
    return datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


def assert_notify_end_after(end: datetime, before: datetime, after: datetime, seconds: float) -> None:
    """Check that ``end`` is ``seconds`` after the cancel call, which ran between the two times."""
    # The file contains whole seconds, so allow one second of truncation on the early side.
    assert before + timedelta(seconds=seconds - 1) <= end <= after + timedelta(seconds=seconds)


def messages_from(logs: LogCollector, session: Session, prefix: str) -> list[str]:
    return [message for message in logs.messages(session_id_of(session)) if message.startswith(prefix)]


# ----- TERMINATE ---------------------------------------------------------------------------


def test_terminate_cancel_kills_process(make_session: SessionFactory, logs: LogCollector) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    pid = start_task(session, trap_step("stubborn"))

    session.cancel_action()
    status = recorder.wait_final()

    assert status.state == ActionState.CANCELED
    assert status.exit_code == -9
    assert term_count(session) == 0
    assert not (session.working_directory / "cancel_info.json").exists()
    assert session.state == SessionState.READY_ENDING
    entries = logs.snapshot(session_id_of(session))
    cancel_index = next(i for i, e in enumerate(entries) if e.message.startswith("Canceling subprocess"))
    cancel, kill = entries[cancel_index], entries[cancel_index + 1]
    assert re.fullmatch(rf"Canceling subprocess {pid} via termination method at {TIMESTAMP}\.", cancel.message)
    assert kill.message == f'INTERRUPT: Sending signal "kill" to process group {pid}'
    assert cancel.content == kill.content == LogContent.PROCESS_CONTROL
    assert entries[-1].message == f"Process pid {pid} exited with code: -9 (unsigned) / -0x9 (hex)"


def test_terminate_kills_process_tree(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    code = (
        "import json, subprocess, sys, time\n"
        "sleeper = [sys.executable, '-c', 'import time; time.sleep(120)']\n"
        "same_group = subprocess.Popen(sleeper)\n"
        "own_session = subprocess.Popen(sleeper, start_new_session=True)\n"
        "json.dump([same_group.pid, own_session.pid], open('children.json', 'w'))\n"
        "time.sleep(120)\n"
    )
    session.run_task(step_script=python_step(code), task_parameter_values={})
    children = json.loads(wait_for_file(session.working_directory / "children.json"))

    try:
        session.cancel_action()
        assert recorder.wait_final().state == ActionState.CANCELED
        assert wait_until(lambda: not any(pid_alive(pid) for pid in children), 5)
    finally:
        kill_quietly(children)


def test_cancel_right_after_start(make_session: SessionFactory) -> None:
    # The RUNNING callback is the earliest moment a client can cancel. Several attempts make
    # a missed kill show up reliably, and each attempt ends quickly when the kill works.
    sessions: list[Session] = []

    def cancel_when_running(session_id: str, status: ActionStatus) -> None:
        if status == ActionStatus(state=ActionState.RUNNING):
            sessions[-1].cancel_action()

    for _attempt in range(20):
        recorder = CallbackRecorder(on_call=cancel_when_running)
        session = make_session(callback=recorder)
        sessions.append(session)

        session.run_task(step_script=python_step("import time; time.sleep(60)"), task_parameter_values={})

        assert recorder.wait_final(timeout=3) == ActionStatus(state=ActionState.CANCELED, exit_code=-9)


def test_time_limit_ignored_by_terminate(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    start_task(session, trap_step("stubborn"))

    session.cancel_action(time_limit=timedelta(seconds=60))

    assert recorder.wait_final(timeout=10).state == ActionState.CANCELED
    assert term_count(session) == 0


def test_mark_action_failed_terminate(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    start_task(session, trap_step("stubborn"))

    session.cancel_action(mark_action_failed=True)
    status = recorder.wait_final()

    assert status.state == ActionState.FAILED
    assert status.exit_code == -9
    assert session.state == SessionState.READY_ENDING


# ----- NOTIFY_THEN_TERMINATE -----------------------------------------------------------------


def test_notify_default_task_period(make_session: SessionFactory, logs: LogCollector) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    pid = start_task(session, trap_step("graceful", cancelation=NOTIFY))

    before = datetime.now(timezone.utc)
    session.cancel_action()
    after = datetime.now(timezone.utc)
    status = recorder.wait_final()

    assert status.state == ActionState.CANCELED
    assert status.exit_code == 0
    end = notify_end(session)
    assert_notify_end_after(end, before, after, 120)
    # The file was complete when the process handled the notify signal.
    assert (session.working_directory / "notified.json").read_text() == (
        session.working_directory / "cancel_info.json"
    ).read_text()
    end_text = end.strftime("%Y-%m-%dT%H:%M:%SZ")
    notices = [
        e for e in logs.snapshot(session_id_of(session)) if e.message.startswith(("Canceling", "Grace", "INTERRUPT"))
    ]
    assert len(notices) == 3
    assert re.fullmatch(
        rf"Canceling subprocess {pid} via notify then terminate method at {TIMESTAMP}\.", notices[0].message
    )
    assert notices[1].message == f"Grace period ends at {end_text}"
    assert notices[2].message == f'INTERRUPT: Sending signal "term" to process {pid}'
    assert {e.content for e in notices} == {LogContent.PROCESS_CONTROL}
    assert not messages_from(logs, session, "Notify period ended")


@pytest.mark.parametrize("action_name", ["onEnter", "onExit"])
def test_notify_default_environment_period(make_session: SessionFactory, action_name: str) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    env = environment(
        {"name": "Notified", "script": {"actions": {action_name: trap_action("graceful", cancelation=NOTIFY)}}}
    )
    identifier = session.enter_environment(environment=env)
    if action_name == "onExit":
        recorder.wait_final()
        session.exit_environment(identifier=identifier)
    wait_for_file(session.working_directory / "pid.txt")

    before = datetime.now(timezone.utc)
    session.cancel_action()
    after = datetime.now(timezone.utc)

    assert recorder.wait_final().state == ActionState.CANCELED
    assert_notify_end_after(notify_end(session), before, after, 30)


def test_notify_period_format_string(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder, job_parameter_values=parameter_values(Period=("INT", "45")))
    start_task(session, trap_step("graceful", cancelation={**NOTIFY, "notifyPeriodInSeconds": "{{Param.Period}}"}))

    before = datetime.now(timezone.utc)
    session.cancel_action()
    after = datetime.now(timezone.utc)

    assert recorder.wait_final().state == ActionState.CANCELED
    assert_notify_end_after(notify_end(session), before, after, 45)


@pytest.mark.parametrize("period", ["soon", "0"])
def test_invalid_notify_period_fails(make_session: SessionFactory, period: str) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder, job_parameter_values=parameter_values(Period=period))
    cancelation = {**NOTIFY, "notifyPeriodInSeconds": "{{Param.Period}}"}

    session.run_task(step_script=trap_step("graceful", cancelation=cancelation), task_parameter_values={})
    status = recorder.wait_final()

    assert status.state == ActionState.FAILED
    assert status.exit_code is None
    assert status.fail_message is not None
    assert "notifyPeriodInSeconds" in status.fail_message
    assert not (session.working_directory / "pid.txt").exists()
    assert session.state == SessionState.READY_ENDING


def test_cancel_info_file_format(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    start_task(session, trap_step("graceful", cancelation={**NOTIFY, "notifyPeriodInSeconds": 10}))

    session.cancel_action()
    recorder.wait_final()

    path = session.working_directory / "cancel_info.json"
    assert re.fullmatch(r'\{"NotifyEnd": "' + TIMESTAMP + r'"\}', path.read_text())
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)


def test_notify_period_then_kill(make_session: SessionFactory, logs: LogCollector) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    pid = start_task(session, trap_step("stubborn", cancelation={**NOTIFY, "notifyPeriodInSeconds": 1}))

    session.cancel_action()
    # cancel_action() does not wait, and the action keeps running during the notify period.
    assert session.state == SessionState.RUNNING
    status = recorder.wait_final()

    assert status.state == ActionState.CANCELED
    assert status.exit_code == -9
    assert term_count(session) == 1
    ended = [e for e in logs.snapshot(session_id_of(session)) if e.msg == "Notify period ended. Terminate at %s"]
    assert len(ended) == 1
    assert re.fullmatch(f"Notify period ended. Terminate at {TIMESTAMP}", ended[0].message)
    assert ended[0].content == LogContent.PROCESS_CONTROL
    messages = logs.messages(session_id_of(session))
    kill_line = f'INTERRUPT: Sending signal "kill" to process group {pid}'
    assert messages.index(ended[0].message) < messages.index(kill_line)
    assert len(messages_from(logs, session, "Canceling subprocess")) == 1


def test_exit_during_notify_keeps_code(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    start_task(session, trap_step("exit7", cancelation=NOTIFY))

    session.cancel_action()
    status = recorder.wait_final()

    assert status.state == ActionState.CANCELED
    assert status.exit_code == 7


def test_time_limit_caps_grace(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    start_task(session, trap_step("stubborn", cancelation=NOTIFY))

    before = datetime.now(timezone.utc)
    session.cancel_action(time_limit=timedelta(seconds=1))
    after = datetime.now(timezone.utc)
    status = recorder.wait_final()

    assert status.state == ActionState.CANCELED
    assert status.exit_code == -9
    assert term_count(session) == 1
    assert_notify_end_after(notify_end(session), before, after, 1)


def test_zero_time_limit_no_notify(make_session: SessionFactory, logs: LogCollector) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    start_task(session, trap_step("graceful", cancelation=NOTIFY))

    session.cancel_action(time_limit=timedelta(0))
    status = recorder.wait_final()

    assert status.state == ActionState.CANCELED
    assert status.exit_code == -9
    assert term_count(session) == 0
    assert not messages_from(logs, session, 'INTERRUPT: Sending signal "term"')
    assert messages_from(logs, session, 'INTERRUPT: Sending signal "kill"')


def test_mark_action_failed_notify(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    start_task(session, trap_step("graceful", cancelation=NOTIFY))

    session.cancel_action(mark_action_failed=True)
    status = recorder.wait_final()

    assert status.state == ActionState.FAILED
    assert status.exit_code == 0


def test_repeated_cancel_shortens_grace(make_session: SessionFactory, logs: LogCollector) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    start_task(session, trap_step("stubborn", cancelation=NOTIFY))

    session.cancel_action()
    assert wait_until(lambda: term_count(session) == 1, 10)
    first_end = notify_end(session)
    before = datetime.now(timezone.utc)
    session.cancel_action(time_limit=timedelta(seconds=1))
    after = datetime.now(timezone.utc)
    status = recorder.wait_final()

    assert status.state == ActionState.CANCELED
    assert status.exit_code == -9
    assert first_end > after + timedelta(seconds=100)
    assert_notify_end_after(notify_end(session), before, after, 1)
    assert term_count(session) == 2
    assert len(messages_from(logs, session, "Grace period ends at ")) == 2


def test_repeated_cancel_latest_mark_wins(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    start_task(session, trap_step("stubborn", cancelation=NOTIFY))

    session.cancel_action(mark_action_failed=True)
    session.cancel_action(time_limit=timedelta(0))

    assert recorder.wait_final().state == ActionState.CANCELED


# ----- runtime limits ------------------------------------------------------------------------


@pytest.mark.slow
def test_timeout_terminates_action(make_session: SessionFactory, logs: LogCollector) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    pid = start_task(session, trap_step("stubborn", timeout=1))

    status = recorder.wait_final()

    assert status.state == ActionState.TIMEOUT
    assert status.exit_code == -9
    assert session.state == SessionState.READY_ENDING
    assert not pid_alive(pid)
    entries = logs.snapshot(session_id_of(session))
    timeouts = [e for e in entries if e.msg == "TIMEOUT - Runtime limit reached at %s. Canceling action."]
    assert len(timeouts) == 1
    assert re.fullmatch(f"TIMEOUT - Runtime limit reached at {TIMESTAMP}. Canceling action.", timeouts[0].message)
    assert timeouts[0].content == LogContent.PROCESS_CONTROL
    messages = [e.message for e in entries]
    cancel = messages_from(logs, session, "Canceling subprocess")
    assert len(cancel) == 1
    assert messages.index(timeouts[0].message) < messages.index(cancel[0])


@pytest.mark.slow
def test_timeout_uses_notify_method(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    start_task(session, trap_step("stubborn", timeout=1, cancelation={**NOTIFY, "notifyPeriodInSeconds": 1}))

    status = recorder.wait_final()

    assert status.state == ActionState.TIMEOUT
    assert status.exit_code == -9
    assert term_count(session) == 1


@pytest.mark.slow
def test_timeout_graceful_exit_state(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    start_task(session, trap_step("exit7", timeout=1, cancelation=NOTIFY))

    status = recorder.wait_final()

    assert status.state == ActionState.TIMEOUT
    assert status.exit_code == 7


@pytest.mark.slow
def test_user_cancel_beats_timeout(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    start_task(session, trap_step("stubborn", timeout=1, cancelation=NOTIFY))

    session.cancel_action(time_limit=timedelta(seconds=2))
    status = recorder.wait_final()

    assert status.state == ActionState.CANCELED
    assert status.exit_code == -9


@pytest.mark.slow
def test_timeout_with_mark_failed_cancel(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    start_task(session, trap_step("stubborn", timeout=1, cancelation={**NOTIFY, "notifyPeriodInSeconds": 1}))

    assert wait_until(lambda: term_count(session) == 1, 10)
    session.cancel_action(mark_action_failed=True)

    assert recorder.wait_final().state == ActionState.FAILED


# ----- cancel windows ------------------------------------------------------------------------


def test_cleanup_terminates_notify_action(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    pid = start_task(session, trap_step("stubborn", cancelation=NOTIFY))

    session.cleanup()

    assert session.state == SessionState.ENDED
    assert recorder.wait_final(timeout=1) == ActionStatus(state=ActionState.CANCELED, exit_code=-9)
    assert not pid_alive(pid)
    assert not session.working_directory.exists()


def test_cancel_during_output_drain(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    code = (
        "import os, subprocess, sys\n"
        "helper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "open('helper.txt', 'w').write(str(helper.pid))\n"
        "open('pid.txt', 'w').write(str(os.getpid()))\n"
    )
    session.run_task(step_script=python_step(code), task_parameter_values={})
    helper = int(wait_for_file(session.working_directory / "helper.txt"))
    main = int(wait_for_file(session.working_directory / "pid.txt"))

    try:
        assert wait_until(lambda: not pid_alive(main), 10)
        assert session.state == SessionState.RUNNING
        session.cancel_action()
        status = recorder.wait_final()

        assert status.state == ActionState.CANCELED
        assert status.exit_code == 0
        assert wait_until(lambda: not pid_alive(helper), 5)
    finally:
        kill_quietly([helper])


def test_cancel_after_end_rejected(make_session: SessionFactory) -> None:
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    session.run_task(step_script=python_step("pass"), task_parameter_values={})
    recorder.wait_final()

    with pytest.raises(RuntimeError, match="^No actions are running$"):
        session.cancel_action()
    assert recorder.states == [ActionState.RUNNING, ActionState.SUCCESS]
