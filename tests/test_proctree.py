"""Tests for _proctree: finding and killing every process of an action, with real processes.

Child programs are ``sys.executable -c`` snippets that write their pid to a file in a
per-test directory. That directory is also each child's only argument, so the teardown
kills, by pid, only processes whose command line names it. Tests of the ``cgroup``
mechanism are skipped where this process cannot create cgroups (not root, no cgroup v2).
"""

from __future__ import annotations

import functools
import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable, Optional

import pytest

from openjd.sessions._proctree import (
    CGROUP,
    PROCESS_GROUP,
    TRACKING_ENV_VAR,
    ActionProcesses,
    KillPermissionError,
    SessionProcesses,
)
from openjd.sessions._proctree_cgroup import find_own_cgroup_dir
from openjd.sessions._proctree_scan import ActionRoot, read_proc_stat, scan_processes
from openjd.sessions._proctree_scan import select_action_processes as select_processes

TIMEOUT = 20.0  # Guards against hangs only; every wait normally ends far sooner.

# Defines record(name): write this process's pid to <directory>/<name> atomically.
PRELUDE = """
import os, sys, time
D = sys.argv[1]
def record(name):
    path = os.path.join(D, name)
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(path + ".tmp", path)
def wait_for(name):
    while not os.path.exists(os.path.join(D, name)):
        time.sleep(0.01)
"""

# The child starts a grandchild in a new session and exits; then the main process exits.
ORPHANED_SETSID_GRANDCHILD = """
record("main")
if os.fork() == 0:
    if os.fork() == 0:
        os.setsid()
        record("grandchild")
        time.sleep(120)
        os._exit(0)
    os._exit(0)
os.wait()
wait_for("grandchild")
"""

# The child starts a grandchild in a new session and stays alive.
SETSID_CHILD_OF_LIVE_PARENT = """
record("main")
if os.fork() == 0:
    record("child")
    if os.fork() == 0:
        os.setsid()
        record("grandchild")
        time.sleep(120)
        os._exit(0)
    time.sleep(120)
    os._exit(0)
time.sleep(120)
"""

# The child moves a grandchild into a new process group (same session) and exits.
ORPHAN_IN_NEW_GROUP = """
record("main")
if os.fork() == 0:
    if os.fork() == 0:
        os.setpgid(0, 0)
        record("grandchild")
        time.sleep(120)
        os._exit(0)
    os._exit(0)
os.wait()
time.sleep(120)
"""

# A classic daemon: fork, setsid, fork, close stdout and stderr; the main process exits.
DOUBLE_FORKED_DAEMON = """
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 1)
        os.dup2(null, 2)
        record("daemon")
        time.sleep(120)
        os._exit(0)
    os._exit(0)
os.wait()
wait_for("daemon")
print("main exits", flush=True)
"""

# Each process forks up to two children, 20 ms apart, until about 40 pid files exist.
# Every other child moves to a new process group, so a group kill alone misses it.
FORK_BOMB = """
LIMIT = 40
def grow():
    for _ in range(2):
        if len(os.listdir(D)) >= LIMIT:
            return
        time.sleep(0.02)
        if os.fork() == 0:
            if os.getpid() % 2:
                os.setpgid(0, 0)
            record(str(os.getpid()))
            grow()
            time.sleep(120)
            os._exit(0)
record("main")
grow()
time.sleep(120)
"""

# Two spawners in process groups of their own each fork a child every 3 ms, 30 in all (about
# 0.1 s), and each child moves to a new process group and sleeps. So forks happen between
# the scan and the signals of a kill, and a group kill alone catches none of the children.
# A spawner records "done" after its last fork.
FORK_SPAWNERS = """
record("main")
for _ in range(2):
    if os.fork() == 0:
        os.setpgid(0, 0)
        for _ in range(30):
            time.sleep(0.003)
            if os.fork() == 0:
                os.setpgid(0, 0)
                record(str(os.getpid()))
                time.sleep(120)
                os._exit(0)
        record("done")
        time.sleep(120)
        os._exit(0)
time.sleep(120)
"""

# Eight chains of processes: each link forks the next one about every millisecond and exits
# at once, so about sixteen processes are alive at any time. A process that a scan found has
# often exited before its signal arrives, leaving a new child. Every other link moves to a
# new process group. A chain ends after 150 links (a fraction of a second), which
# bounds the pids it consumes; its last link then records "done".
FORK_CHAINS = """
record("main")
def chain():
    for n in range(150):
        time.sleep(0.001)
        if os.fork() != 0:
            os._exit(0)
        if n % 2:
            os.setpgid(0, 0)
    record("done")
    os._exit(0)
for _ in range(8):
    if os.fork() == 0:
        chain()
time.sleep(120)
"""

SLEEPER_WITH_CHILD = """
record("main")
if os.fork() == 0:
    record("child")
    time.sleep(120)
    os._exit(0)
time.sleep(120)
"""


@functools.cache
def cgroup_available() -> bool:
    probe = SessionProcesses("probe")
    probe.close()
    return probe.mechanism == CGROUP


needs_cgroup = pytest.mark.skipif(not cgroup_available(), reason="needs a writable cgroup v2 (run as root)")


def is_alive(pid: int) -> bool:
    proc = read_proc_stat(pid)
    return proc is not None and not proc.zombie


def parent_of(pid: int) -> Optional[int]:
    proc = read_proc_stat(pid)
    return None if proc is None else proc.ppid


def cgroup_of(pid: str) -> str:
    with open(f"/proc/{pid}/cgroup", encoding="utf-8") as file:
        return next(line[3:].rstrip("\n") for line in file if line.startswith("0::"))


def running_with_marker(directory: Path) -> list[int]:
    """Return the live processes whose command line contains ``directory``."""
    marker = str(directory).encode()
    found = []
    for proc in scan_processes().values():
        try:
            with open(f"/proc/{proc.pid}/cmdline", "rb") as file:
                if marker in file.read() and not proc.zombie:
                    found.append(proc.pid)
        except OSError:
            continue
    return found


def wait_until(condition: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return bool(condition())


class Children:
    """Starts child programs for one test and kills whatever is left of them afterwards."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.popens: list[subprocess.Popen[bytes]] = []

    def start(self, code: str, **popen_args: object) -> subprocess.Popen[bytes]:
        args: dict[str, object] = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL}
        args.update(popen_args)
        popen = subprocess.Popen(
            [sys.executable, "-c", PRELUDE + code, str(self.directory)],
            start_new_session=True,
            **args,  # type: ignore[call-overload]
        )
        self.popens.append(popen)
        return popen

    def start_tracked(
        self, session: SessionProcesses, code: str, **popen_args: object
    ) -> tuple[subprocess.Popen[bytes], ActionProcesses]:
        """Start ``code`` as the library does: joining its cgroup before exec, then track()."""
        popen = self.start(code, preexec_fn=session.child_setup(), **popen_args)
        return popen, session.track(popen.pid)

    def pid(self, name: str) -> int:
        path = self.directory / name
        assert wait_until(path.exists), f"{name} never recorded its pid"
        return int(path.read_text())

    def recorded_pids(self) -> list[int]:
        texts = [p.read_text() for p in self.directory.iterdir() if p.suffix != ".tmp"]
        return [int(text) for text in texts if text]

    def kill_leftovers(self) -> None:
        marker = str(self.directory).encode()
        for pid in self.recorded_pids() + [p.pid for p in self.popens]:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as file:
                    if marker not in file.read():
                        continue
                os.kill(pid, signal.SIGKILL)
            except OSError:
                continue
        for popen in self.popens:
            popen.wait(timeout=TIMEOUT)


@pytest.fixture
def children(tmp_path: Path) -> Iterator[Children]:
    directory = tmp_path / "pids"
    directory.mkdir()
    started = Children(directory)
    try:
        yield started
    finally:
        started.kill_leftovers()


@pytest.fixture(params=[CGROUP, PROCESS_GROUP])
def session(request: pytest.FixtureRequest) -> Iterator[SessionProcesses]:
    if request.param == CGROUP and not cgroup_available():
        pytest.skip("needs a writable cgroup v2 (run as root)")
    processes = SessionProcesses(f"test-{request.node.name}", request.param)
    try:
        yield processes
    finally:
        processes.kill_all()
        processes.close()


@pytest.fixture
def cgroup_session(request: pytest.FixtureRequest) -> Iterator[SessionProcesses]:
    processes = SessionProcesses(f"test-{request.node.name}", CGROUP)
    try:
        yield processes
    finally:
        processes.kill_all()
        processes.close()


@pytest.fixture
def group_session(request: pytest.FixtureRequest) -> Iterator[SessionProcesses]:
    processes = SessionProcesses(f"test-{request.node.name}", PROCESS_GROUP)
    try:
        yield processes
    finally:
        processes.kill_all()
        processes.close()


# --- Choosing the mechanism -------------------------------------------------------------


def test_env_var_forces_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TRACKING_ENV_VAR, PROCESS_GROUP)

    processes = SessionProcesses("forced")

    assert processes.mechanism == PROCESS_GROUP
    assert processes.cgroup_path is None


@pytest.mark.parametrize("from_env", [True, False])
def test_invalid_mechanism_raises_value_error(monkeypatch: pytest.MonkeyPatch, from_env: bool) -> None:
    if from_env:
        monkeypatch.setenv(TRACKING_ENV_VAR, "systemd")
        with pytest.raises(ValueError, match=f"'systemd' in the {TRACKING_ENV_VAR}"):
            SessionProcesses("bad")
    else:
        with pytest.raises(ValueError, match="'systemd' in the mechanism argument"):
            SessionProcesses("bad", "systemd")


@needs_cgroup
def test_auto_creates_named_session_cgroup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRACKING_ENV_VAR, raising=False)
    parent, _ = find_own_cgroup_dir()

    processes = SessionProcesses("my session/1")
    try:
        assert processes.mechanism == CGROUP
        assert processes.cgroup_path is not None
        assert os.path.dirname(processes.cgroup_path) == parent
        assert os.path.basename(processes.cgroup_path).startswith("openjd-my_session_1-")
        assert os.path.isdir(processes.cgroup_path)
    finally:
        processes.close()


# --- cgroup mechanism -------------------------------------------------------------------


@needs_cgroup
def test_cgroup_kills_orphaned_setsid_grandchild(cgroup_session: SessionProcesses, children: Children) -> None:
    main, action = children.start_tracked(cgroup_session, ORPHANED_SETSID_GRANDCHILD)
    grandchild = children.pid("grandchild")
    main.wait(timeout=TIMEOUT)

    assert action.mechanism == CGROUP
    assert action.members() == [grandchild]
    assert action.kill() == [grandchild]
    assert action.wait_empty(TIMEOUT)
    assert not is_alive(grandchild)


@needs_cgroup
def test_cgroup_track_after_spawn_kills_orphan(cgroup_session: SessionProcesses, children: Children) -> None:
    # Without child_setup(). The child forks only once the "go" file exists, after track().
    main = children.start('wait_for("go")\n' + ORPHANED_SETSID_GRANDCHILD)
    action = cgroup_session.track(main.pid)
    (children.directory / "go").write_text("")
    grandchild = children.pid("grandchild")
    main.wait(timeout=TIMEOUT)

    assert action.mechanism == CGROUP
    assert action.kill() == [grandchild]
    assert action.wait_empty(TIMEOUT)
    assert not is_alive(grandchild)


@needs_cgroup
def test_child_setup_joins_before_exec(cgroup_session: SessionProcesses, children: Children) -> None:
    main = children.start("time.sleep(120)", preexec_fn=cgroup_session.child_setup())
    assert cgroup_session.cgroup_path is not None
    session_name = os.path.basename(cgroup_session.cgroup_path)

    assert cgroup_of(str(main.pid)).endswith(f"/{session_name}/action-1")  # Before track().
    action = cgroup_session.track(main.pid)
    assert action.cgroup_path == os.path.join(cgroup_session.cgroup_path, "action-1")
    assert action.members() == [main.pid]


def test_child_setup_none_without_cgroup(group_session: SessionProcesses) -> None:
    assert group_session.child_setup() is None


@needs_cgroup
def test_cgroup_daemon_killed_at_cleanup(cgroup_session: SessionProcesses, children: Children) -> None:
    main, action = children.start_tracked(cgroup_session, DOUBLE_FORKED_DAEMON, stdout=subprocess.PIPE)
    output, _ = main.communicate(timeout=TIMEOUT)  # EOF: the daemon closed its stdout.
    daemon = children.pid("daemon")
    assert output == b"main exits\n"
    assert is_alive(daemon)

    action.release()
    assert action.cgroup_path is not None
    assert os.path.isdir(action.cgroup_path), "release() removed a populated cgroup"
    assert action.members() == [daemon]

    assert cgroup_session.kill_all() == [daemon]
    cgroup_session.close()
    assert not is_alive(daemon)
    assert cgroup_session.cgroup_path is not None
    assert not os.path.exists(cgroup_session.cgroup_path)


@needs_cgroup
def test_cgroup_track_moves_existing_descendants(cgroup_session: SessionProcesses, children: Children) -> None:
    main = children.start(SLEEPER_WITH_CHILD)
    child = children.pid("child")  # The child exists before track() runs.

    action = cgroup_session.track(main.pid)

    assert action.cgroup_path is not None
    parent, _ = find_own_cgroup_dir()
    assert parent is not None
    expected = os.path.join(cgroup_of("self"), os.path.relpath(action.cgroup_path, parent))
    assert cgroup_of(str(child)) == expected
    assert action.members() == sorted([main.pid, child])


@needs_cgroup
def test_cgroup_freeze_path_kills_all(cgroup_session: SessionProcesses, children: Children) -> None:
    cgroup_session._use_kill_file = False  # As on Linux before 5.14.
    main, action = children.start_tracked(cgroup_session, SETSID_CHILD_OF_LIVE_PARENT)
    expected = sorted([main.pid, children.pid("child"), children.pid("grandchild")])

    assert action.kill() == expected
    assert action.wait_empty(TIMEOUT)
    assert action.cgroup_path is not None
    with open(os.path.join(action.cgroup_path, "cgroup.freeze"), encoding="utf-8") as file:
        assert file.read().strip() == "0", "the cgroup was left frozen"
    assert not any(is_alive(pid) for pid in expected)


@needs_cgroup
def test_cgroup_cpu_usage_counts_busy_loop(cgroup_session: SessionProcesses, children: Children) -> None:
    busy = "start = time.process_time()\nwhile time.process_time() - start < 0.3:\n    pass\n"
    main, action = children.start_tracked(cgroup_session, busy)
    main.wait(timeout=TIMEOUT)

    usage = action.cpu_usage_seconds()
    assert usage is not None
    assert usage >= 0.3
    action.release()
    assert action.cpu_usage_seconds() == usage


def test_group_cpu_usage_is_none(group_session: SessionProcesses, children: Children) -> None:
    _, action = children.start_tracked(group_session, "")

    assert action.cpu_usage_seconds() is None


@needs_cgroup
def test_cgroup_track_reaped_pid_falls_back(cgroup_session: SessionProcesses) -> None:
    exited = subprocess.Popen([sys.executable, "-c", ""])
    exited.wait(timeout=TIMEOUT)

    action = cgroup_session.track(exited.pid)

    assert action.mechanism == PROCESS_GROUP
    assert action.tracking_error is None
    assert action.cgroup_path is None
    assert cgroup_session.cgroup_path is not None
    assert [n for n in os.listdir(cgroup_session.cgroup_path) if n.startswith("action-")] == []


@needs_cgroup
def test_cgroup_track_zombie_falls_back(cgroup_session: SessionProcesses, children: Children) -> None:
    # The main process exits, unreaped, before track(), so its orphan is found by session id.
    code = """
if os.fork() == 0:
    os.setpgid(0, 0)
    record("orphan")
    time.sleep(120)
    os._exit(0)
wait_for("orphan")
"""
    main = children.start(code)
    orphan = children.pid("orphan")
    assert wait_until(lambda: not is_alive(main.pid))

    action = cgroup_session.track(main.pid)

    assert action.mechanism == PROCESS_GROUP
    assert action.tracking_error is None
    assert action.kill() == [orphan]
    assert action.wait_empty(TIMEOUT)


@needs_cgroup
def test_close_removes_session_cgroups(children: Children) -> None:
    processes = SessionProcesses("closing", CGROUP)
    assert processes.cgroup_path is not None
    parent = os.path.dirname(processes.cgroup_path)
    prefix = os.path.basename(processes.cgroup_path)
    finished, first = children.start_tracked(processes, "")
    _, running = children.start_tracked(processes, "time.sleep(120)")
    finished.wait(timeout=TIMEOUT)
    first.release()

    running.kill()
    processes.close()
    processes.close()

    assert not [name for name in os.listdir(parent) if name.startswith(prefix)]
    with pytest.raises(RuntimeError, match="closed"):
        processes.track(finished.pid)


@needs_cgroup
def test_dropped_session_removes_cgroup(children: Children) -> None:
    processes = SessionProcesses("dropped", CGROUP)
    path = processes.cgroup_path
    assert path is not None
    main, action = children.start_tracked(processes, "")
    main.wait(timeout=TIMEOUT)

    del processes, action  # An action refers to its session.
    gc.collect()

    assert not os.path.exists(path)


# --- process-group mechanism ------------------------------------------------------------


def test_group_kills_live_setsid_descendant(group_session: SessionProcesses, children: Children) -> None:
    main, action = children.start_tracked(group_session, SETSID_CHILD_OF_LIVE_PARENT)
    expected = sorted([main.pid, children.pid("child"), children.pid("grandchild")])

    assert action.members() == expected
    assert action.kill() == expected
    assert action.wait_empty(TIMEOUT)
    assert not any(is_alive(pid) for pid in expected)


def test_group_kills_orphan_in_session(group_session: SessionProcesses, children: Children) -> None:
    main, action = children.start_tracked(group_session, ORPHAN_IN_NEW_GROUP)
    grandchild = children.pid("grandchild")
    assert wait_until(lambda: parent_of(grandchild) not in (None, main.pid))  # Orphaned.
    info = read_proc_stat(grandchild)
    assert info is not None
    assert (info.pgid, info.sid) == (grandchild, main.pid)

    assert grandchild in action.kill()
    assert action.wait_empty(TIMEOUT)
    assert not is_alive(grandchild)


def test_group_misses_orphaned_setsid_grandchild(group_session: SessionProcesses, children: Children) -> None:
    # The limitation that the module documentation states for this mechanism.
    main, action = children.start_tracked(group_session, ORPHANED_SETSID_GRANDCHILD)
    grandchild = children.pid("grandchild")
    main.wait(timeout=TIMEOUT)

    assert action.kill() == []
    assert is_alive(grandchild)


def test_group_release_closes_pidfd(group_session: SessionProcesses, children: Children) -> None:
    before = len(os.listdir("/proc/self/fd"))
    main, action = children.start_tracked(group_session, "")
    assert len(os.listdir("/proc/self/fd")) == before + 1  # The pidfd of the main process.

    main.wait(timeout=TIMEOUT)
    action.release()

    assert len(os.listdir("/proc/self/fd")) == before
    assert action.members() == []


def test_group_parses_odd_command_name(group_session: SessionProcesses, children: Children) -> None:
    code = """
if os.fork() == 0:
    with open("/proc/self/comm", "w") as f:
        f.write("a) b (c")
    os.setpgid(0, 0)
    record("odd")
    time.sleep(120)
    os._exit(0)
time.sleep(120)
"""
    main, action = children.start_tracked(group_session, code)
    odd = children.pid("odd")

    info = read_proc_stat(odd)
    assert info is not None
    assert (info.ppid, info.pgid, info.sid) == (main.pid, odd, main.pid)
    assert action.members() == sorted([main.pid, odd])


def test_select_skips_reused_main_pid(children: Children) -> None:
    main = children.start(SLEEPER_WITH_CHILD)
    child = children.pid("child")
    table = scan_processes()
    start_time = table[main.pid].start_time
    assert start_time is not None

    same = ActionRoot(main.pid, start_time)
    reused = ActionRoot(main.pid, start_time + 1)

    assert select_processes(table, [same]) == {main.pid, child}
    assert select_processes(table, [reused]) == set()
    assert select_processes(table, [ActionRoot(main.pid, None, reaped=True)]) == set()
    del table[main.pid]  # As if reaped: its group and session still select the child.
    assert select_processes(table, [ActionRoot(main.pid, None, reaped=True)]) == {child}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to the nobody user")
def test_non_root_kill_reports_denied_pids(children: Children) -> None:
    target = children.start("time.sleep(120)")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (runs in the forked child)
        result: dict[str, object] = {}
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            processes = SessionProcesses("unprivileged", "auto")
            result["mechanism"] = processes.mechanism
            try:
                processes.track(target.pid).kill()
            except KillPermissionError as err:
                result["denied"] = err.denied
        except BaseException as err:
            result["error"] = repr(err)
        os.write(write_end, json.dumps(result).encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as file:
        result = json.loads(file.read())

    assert result == {"mechanism": PROCESS_GROUP, "denied": [target.pid]}
    assert is_alive(target.pid)


# --- Both mechanisms --------------------------------------------------------------------


def test_kill_catches_forks_during_kill(session: SessionProcesses, children: Children) -> None:
    main, action = children.start_tracked(session, FORK_SPAWNERS)
    children.pid("main")
    time.sleep(0.02)

    action.kill()

    assert action.wait_empty(TIMEOUT)
    assert running_with_marker(children.directory) == []
    assert len(children.recorded_pids()) >= 2
    assert not (children.directory / "done").exists(), "the forks ended before the kill"


@needs_cgroup
def test_cgroup_kill_stops_fork_chains(cgroup_session: SessionProcesses, children: Children) -> None:
    # The process-group mechanism cannot promise this: a link may fork and exit between a
    # scan of /proc and the signal, faster than a scan of a busy host takes.
    main, action = children.start_tracked(cgroup_session, FORK_CHAINS)
    children.pid("main")
    time.sleep(0.05)

    action.kill()

    assert action.wait_empty(TIMEOUT)
    assert running_with_marker(children.directory) == []
    assert not (children.directory / "done").exists(), "a chain ended before the kill"


def test_kill_all_kills_every_action(session: SessionProcesses, tmp_path: Path) -> None:
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()
    first, second = Children(first_dir), Children(second_dir)
    try:
        _, first_action = first.start_tracked(session, SLEEPER_WITH_CHILD)
        second.start_tracked(session, SLEEPER_WITH_CHILD)
        expected = sorted([first.pid("main"), first.pid("child"), second.pid("main"), second.pid("child")])

        assert session.kill_all() == expected
        assert first_action.wait_empty(TIMEOUT)
        assert wait_until(lambda: not any(is_alive(pid) for pid in expected))
    finally:
        first.kill_leftovers()
        second.kill_leftovers()


def test_members_empty_after_kill(session: SessionProcesses, children: Children) -> None:
    main, action = children.start_tracked(session, SLEEPER_WITH_CHILD)
    child = children.pid("child")
    assert action.members() == sorted([main.pid, child])

    action.kill()
    assert action.wait_empty(TIMEOUT)

    assert action.members() == []


def test_wait_empty_times_out_while_running(session: SessionProcesses, children: Children) -> None:
    main, action = children.start_tracked(session, "time.sleep(120)")

    assert not action.wait_empty(0.2)
    assert action.members() == [main.pid]


def test_kill_after_exit_returns_empty(session: SessionProcesses, children: Children) -> None:
    main, action = children.start_tracked(session, "")
    main.wait(timeout=TIMEOUT)

    assert action.kill() == []
    assert action.wait_empty(TIMEOUT)
    action.release()
    assert action.kill() == []


def test_kill_while_other_thread_reads_members(session: SessionProcesses, children: Children) -> None:
    main, action = children.start_tracked(session, FORK_BOMB)
    assert wait_until(lambda: len(children.recorded_pids()) >= 4)
    errors: list[BaseException] = []
    stop = threading.Event()

    def read_members() -> None:
        while not stop.is_set():
            try:
                action.members()
            except BaseException as err:
                errors.append(err)
                return

    reader = threading.Thread(target=read_members)
    reader.start()
    try:
        action.kill()
        assert action.wait_empty(TIMEOUT)
    finally:
        stop.set()
        reader.join(TIMEOUT)

    assert errors == []
    assert action.members() == []


@needs_cgroup
def test_released_cgroup_reused_by_next_action(children: Children) -> None:
    processes = SessionProcesses("reuse", CGROUP)
    try:
        finished, first = children.start_tracked(processes, "")
        finished.wait(timeout=TIMEOUT)
        first.release()

        procs_file = processes.next_procs_file()

        assert first.cgroup_path is not None
        assert procs_file == os.path.join(first.cgroup_path, "cgroup.procs")
    finally:
        processes.close()
