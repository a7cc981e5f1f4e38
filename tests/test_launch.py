"""How actions start: the exact environment on every way in, and the standby shell's life."""

from __future__ import annotations

import gc
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest
from helpers import PYTHON, CallbackRecorder, SessionFactory, python_step, step_script, wait_until
from test_proctree import needs_cgroup

from openjd.sessions import ActionState, Session, _launch
from openjd.sessions._proctree import STANDBY_DEPTH
from openjd.sessions._proctree_cgroup import find_own_cgroup_dir, remove_cgroup_dir

pytestmark = pytest.mark.skipif(os.name != "posix", reason="runs POSIX processes")

TRACKING = "OPENJD_SESSIONS_PROCESS_TRACKING"
WRITE_ENV = "import json, os; json.dump({k.hex(): v.hex() for k, v in os.environb.items()}, open('env.json', 'w'))"
ODD_VALUE = "it's\na 'value' with $HOME and `x`"

# Host variables that a shell between the library and the command would drop or change.
ODD_ENVIRONMENTS = {
    "function-names": {"BASH_FUNC_module%%": "() {  eval x\n}", "A-B": "1", "X.Y": "2"},
    "optind": {"OPTIND": "abc"},
    "shell-set": {"PWD": "/nonexistent/pwd", "PPID": ODD_VALUE, "IFS": ODD_VALUE, "OLDPWD": "/o"},
    "no-pwd": {"PWD": None},
    "plain": {},
}


@pytest.fixture
def make_session(tmp_path: Path) -> Iterator[SessionFactory]:
    factory = SessionFactory(tmp_path)
    yield factory
    factory.close()


def run_and_read_env(session: Session, recorder: CallbackRecorder) -> dict[bytes, bytes]:
    recorder.clear()
    session.run_task(step_script=python_step(WRITE_ENV), task_parameter_values={})
    status = recorder.wait_final()
    assert status.state == ActionState.SUCCESS, status
    written = json.loads((session.working_directory / "env.json").read_text())
    return {bytes.fromhex(k): bytes.fromhex(v) for k, v in written.items()}


def host_environment(session: Session) -> dict[bytes, bytes]:
    """Return what every action of ``session`` gets: this process's environment and one variable."""
    return {**os.environb, b"OPENJD_SESSION_WORKING_DIR": bytes(session.working_directory)}


def set_host_env(monkeypatch: pytest.MonkeyPatch, values: dict[str, Optional[str]]) -> None:
    for name, value in values.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


def session_after_one_action(
    make_session: SessionFactory, monkeypatch: pytest.MonkeyPatch
) -> tuple[Session, CallbackRecorder]:
    """Return a cgroup session that ran one action, so that a standby shell waits."""
    monkeypatch.setenv(TRACKING, "cgroup")
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    run_and_read_env(session, recorder)
    assert wait_until(lambda: len(standby_shells()) == STANDBY_DEPTH, 10), "standby shells wait for the next actions"
    return session, recorder


def session_children() -> set[int]:
    """Return the pids of this test process's children."""
    me = str(os.getpid())
    children = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as file:
                    fields = file.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me:
                children.add(int(entry))
    return children


def standby_shells() -> list[int]:
    shells = []
    for pid in session_children():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                cmdline = file.read()
        except OSError:
            continue
        if b". /dev/stdin" in cmdline:
            shells.append(pid)
    return shells


@pytest.mark.parametrize("tracking", ["cgroup", "process-group"])
@pytest.mark.parametrize("case", sorted(ODD_ENVIRONMENTS))
def test_command_sees_exact_environment(
    make_session: SessionFactory, monkeypatch: pytest.MonkeyPatch, tracking: str, case: str
) -> None:
    if tracking == "cgroup" and needs_cgroup.args[0]:
        pytest.skip("needs a writable cgroup v2 (run as root)")
    monkeypatch.setenv(TRACKING, tracking)
    set_host_env(monkeypatch, ODD_ENVIRONMENTS[case])
    recorder = CallbackRecorder()
    session = make_session(callback=recorder, os_env_vars={"SESSION_VAR": ODD_VALUE})
    expected = {**host_environment(session), b"SESSION_VAR": ODD_VALUE.encode()}

    # The first action starts cold; the next ones may use a standby shell.
    for _ in range(3):
        assert run_and_read_env(session, recorder) == expected


@needs_cgroup
def test_changed_environment_between_actions(make_session: SessionFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TRACKING, "cgroup")
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    first = run_and_read_env(session, recorder)
    monkeypatch.setenv("ADDED_LATER", "yes")
    monkeypatch.setenv("PWD", "/changed")

    second = run_and_read_env(session, recorder)

    assert b"ADDED_LATER" not in first
    assert second == host_environment(session)


@needs_cgroup
def test_standby_shell_ends_with_session(make_session: SessionFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    before = session_children()
    session, _ = session_after_one_action(make_session, monkeypatch)
    assert wait_until(lambda: len(standby_shells()) == STANDBY_DEPTH, 10), "standby shells wait for the next actions"

    session.cleanup()

    assert wait_until(lambda: session_children() <= before, 10), session_children() - before


@needs_cgroup
def test_killed_standby_shell_falls_back(make_session: SessionFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    session, recorder = session_after_one_action(make_session, monkeypatch)
    assert wait_until(lambda: len(standby_shells()) == STANDBY_DEPTH, 10)
    for pid in standby_shells():
        os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not standby_shells(), 10)

    assert run_and_read_env(session, recorder) == host_environment(session)


@needs_cgroup
def test_script_without_shebang_runs_on_standby(make_session: SessionFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    session, recorder = session_after_one_action(make_session, monkeypatch)
    script = session.working_directory / "no-shebang"
    script.write_text("echo from-script > out.txt\n")
    script.chmod(0o755)
    recorder.clear()

    session.run_task(
        step_script=step_script({"actions": {"onRun": {"command": "./no-shebang"}}}), task_parameter_values={}
    )
    assert recorder.wait_final().state == ActionState.SUCCESS
    assert (session.working_directory / "out.txt").read_text() == "from-script\n"


@needs_cgroup
def test_cleanup_during_standby_start(make_session: SessionFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TRACKING, "cgroup")
    before = session_children()
    cgroups = []
    for _ in range(20):
        recorder = CallbackRecorder()
        session = make_session(callback=recorder)
        cgroups.append(session._processes.cgroup_path)
        session.run_task(step_script=python_step("pass"), task_parameter_values={})
        assert recorder.wait_final().state == ActionState.SUCCESS
        session.cleanup()  # Right away, while the action's thread may still be starting standby shells.

    assert wait_until(lambda: session_children() <= before, 10), session_children() - before
    assert wait_until(lambda: not any(os.path.exists(path) for path in cgroups if path), 10)


@needs_cgroup
def test_oversized_argument_after_standby(make_session: SessionFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    session, recorder = session_after_one_action(make_session, monkeypatch)
    recorder.clear()

    session.run_task(step_script=big_arg_step(), task_parameter_values={})

    status = recorder.wait_final()
    assert status.state == ActionState.FAILED
    assert status.exit_code is None
    assert status.fail_message is not None and "E2BIG" in status.fail_message


def big_arg_step() -> Any:
    return step_script({"actions": {"onRun": {"command": PYTHON, "args": ["-c", "pass", "x" * 140_000]}}})


@needs_cgroup
def test_recreated_working_directory_after_standby(
    make_session: SessionFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    session, recorder = session_after_one_action(make_session, monkeypatch)
    shutil.rmtree(session.working_directory)
    session.working_directory.mkdir()

    assert run_and_read_env(session, recorder) == host_environment(session)


@pytest.mark.parametrize("tracking", ["cgroup", "process-group"])
def test_umask_change_reaches_next_action(
    make_session: SessionFactory, monkeypatch: pytest.MonkeyPatch, tracking: str
) -> None:
    if tracking == "cgroup" and needs_cgroup.args[0]:
        pytest.skip("needs a writable cgroup v2 (run as root)")
    monkeypatch.setenv(TRACKING, tracking)
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    run_and_read_env(session, recorder)
    if tracking == "cgroup":
        assert wait_until(lambda: len(standby_shells()) == STANDBY_DEPTH, 10)
    previous = os.umask(0o077)
    try:
        recorder.clear()
        session.run_task(
            step_script=python_step("import os; open('umask.txt', 'w').write(oct(os.umask(0)))"),
            task_parameter_values={},
        )
        assert recorder.wait_final().state == ActionState.SUCCESS
    finally:
        os.umask(previous)
    assert (session.working_directory / "umask.txt").read_text() == "0o77"


@pytest.mark.parametrize("tracking", ["cgroup", "process-group"])
def test_relative_path_entry_uses_working_directory(
    make_session: SessionFactory, monkeypatch: pytest.MonkeyPatch, tracking: str
) -> None:
    if tracking == "cgroup" and needs_cgroup.args[0]:
        pytest.skip("needs a writable cgroup v2 (run as root)")
    monkeypatch.setenv(TRACKING, tracking)
    monkeypatch.setenv("PATH", "." + os.pathsep + os.environ["PATH"])
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)
    tool = session.working_directory / "local-tool.sh"
    tool.write_text("#!/bin/sh\necho ran > tool-ran.txt\n")
    tool.chmod(0o755)

    session.run_task(
        step_script=step_script({"actions": {"onRun": {"command": "local-tool.sh"}}}), task_parameter_values={}
    )

    assert recorder.wait_final().state == ActionState.SUCCESS
    assert (session.working_directory / "tool-ran.txt").read_text() == "ran\n"


@needs_cgroup
def test_dropped_session_ends_standby_shells(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TRACKING, "cgroup")
    recorder = CallbackRecorder()
    session = Session(session_id="dropped", job_parameter_values={}, callback=recorder, session_root_directory=tmp_path)
    run_and_read_env(session, recorder)
    assert wait_until(lambda: len(standby_shells()) == STANDBY_DEPTH, 10)
    cgroup = session._processes.cgroup_path
    assert cgroup is not None

    del session
    gc.collect()

    assert wait_until(lambda: not standby_shells(), 10)
    assert wait_until(lambda: not os.path.exists(cgroup), 10)


FORKING_HOST = """
import os, sys, threading, time
sys.path[:0] = sys.argv[1:]
from helpers import python_step
from openjd.sessions import Session, ActionState
done = threading.Event()
session = Session(session_id=os.environ["FORKING_SESSION_ID"], job_parameter_values={},
                  callback=lambda _, status: status.state != ActionState.RUNNING and done.set())
session.run_task(step_script=python_step("pass"), task_parameter_values={})
done.wait(30)
time.sleep(1)
if os.fork() == 0:
    time.sleep(60)
    os._exit(0)
print(os.getpid(), flush=True)
os._exit(0)
"""


@needs_cgroup
def test_standby_shells_end_with_forking_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TRACKING, "cgroup")
    session_id = f"forking-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("FORKING_SESSION_ID", session_id)
    script = tmp_path / "host.py"
    script.write_text(FORKING_HOST)
    tests_dir = str(Path(__file__).parent)
    output = tmp_path / "host.out"
    with output.open("w") as out:
        # Not a pipe: the forked child would keep it open until it ends.
        host = subprocess.run(
            [sys.executable, str(script), tests_dir], stdout=out, stderr=subprocess.STDOUT, timeout=60
        )
    host_pid = output.read_text().strip()
    assert host.returncode == 0, host_pid

    def shells_of_host() -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as file:
                    if b". /dev/stdin" not in file.read():
                        continue
                with open(f"/proc/{entry}/environ", "rb") as file:
                    if b"OPENJD_SESSION_WORKING_DIR" not in file.read():
                        continue
            except OSError:
                continue
            found.append(int(entry))
        return found

    forked = [
        int(entry)
        for entry in os.listdir("/proc")
        if entry.isdigit()
        and _cmdline(int(entry)).startswith(sys.executable.encode())
        and str(script).encode() in _cmdline(int(entry))
    ]
    try:
        assert host_pid
        assert wait_until(lambda: not shells_of_host(), 10), shells_of_host()
    finally:
        for pid in forked:
            os.kill(pid, signal.SIGKILL)
        remove_empty_session_cgroups(session_id)


def remove_empty_session_cgroups(session_id: str) -> None:
    """Remove the cgroups that a host process which exited without cleanup() left behind."""
    own, _ = find_own_cgroup_dir()
    if own is None:
        return
    for session_cgroup in glob.glob(os.path.join(own, f"openjd-{session_id}-*")):
        for action in glob.glob(os.path.join(session_cgroup, "action-*")):
            wait_until(lambda path=action: remove_cgroup_dir(path), 10)
        remove_cgroup_dir(session_cgroup)


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read()
    except OSError:
        return b""


@needs_cgroup
@pytest.mark.parametrize("case", sorted(ODD_ENVIRONMENTS))
def test_env_command_way_in_is_exact(make_session: SessionFactory, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    # The way every environment takes when /bin/sh is not dash (Fedora, RHEL), taken here on purpose.
    monkeypatch.setattr(_launch, "_shell_is_dash", lambda: False)
    monkeypatch.setattr(_launch, "_last_shell_environment", (None, None))
    monkeypatch.setenv(TRACKING, "cgroup")
    set_host_env(monkeypatch, ODD_ENVIRONMENTS[case])
    recorder = CallbackRecorder()
    session = make_session(callback=recorder)

    for _ in range(2):
        assert run_and_read_env(session, recorder) == host_environment(session)
    assert not standby_shells()
