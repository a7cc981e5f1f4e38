"""Sessions whose actions run as another OS user through sudo.

The session runs in a child process as the unprivileged host user, never as root, because
root would hide permission faults. Actions run as the job user. The child process runs
``users_scenarios.py`` and prints a JSON result that these tests check.

The tests need what ``.ci/run`` provides. They run as root on Linux, with
``/usr/bin/sudo``, ``/usr/bin/setpriv`` and a ``/usr/bin/python3`` that can create a venv.
The host user, the job user and a group shared by both must exist. Their names come from
``OPENJD_TEST_HOST_USER``, ``OPENJD_TEST_JOB_USER`` and ``OPENJD_TEST_GROUP``, by default
``openjd-host``, ``openjd-job`` and ``openjd-shared``. A sudoers rule must let the host
user run any command as the job user without a password. Where any of this is missing,
every test here is skipped with the reason.

The host user cannot read the project's ``.venv`` or the repository when they are under a
private home directory. So a module fixture installs this package from the repository into
a venv that every user can read, under ``/opt/openjd-sessions-tests``, keyed by a hash of
``src/`` and ``pyproject.toml``, and copies the scenario script to a readable directory.

Tests whose behaviour depends on process tracking run twice: with ``process-group``, where
the host user kills job-user processes through ``sudo kill``, and with ``cgroup``, in a
cgroup v2 directory delegated to the host user, where ``cgroup.kill`` ends every process.
"""

from __future__ import annotations

import fcntl
import grp
import hashlib
import json
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest

pytestmark = pytest.mark.users

HOST_USER = os.environ.get("OPENJD_TEST_HOST_USER") or "openjd-host"
JOB_USER = os.environ.get("OPENJD_TEST_JOB_USER") or "openjd-job"
SHARED_GROUP = os.environ.get("OPENJD_TEST_GROUP") or "openjd-shared"
# A user in the shared group that has no sudoers rule. The module fixture creates it.
NO_SUDO_USER = "openjd-nosudo"

SUDO = "/usr/bin/sudo"
SETPRIV = "/usr/bin/setpriv"
SYSTEM_PYTHON = "/usr/bin/python3"
TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
CASES_DIR = REPO_ROOT.parent / "shared" / "cases"
VENV_PARENT = Path("/opt/openjd-sessions-tests")
SCENARIO_SCRIPT = "users_scenarios.py"
RESULT_PREFIX = "OPENJD-USERS-RESULT "
PID_PREFIX = "OPENJD-USERS-PID "
TRACKING_ENV_VAR = "OPENJD_SESSIONS_PROCESS_TRACKING"
HOST_MARKER_VAR = "OPENJD_TEST_HOST_ONLY"

# Guards against hangs only: a scenario normally takes a few seconds.
SCENARIO_TIMEOUT = 120.0
# Venvs of other source versions unused for this long are deleted when a new one is built.
STALE_VENV_SECONDS = 3600

# A value that a shell would change if it were not quoted: quotes, $, a backquote, a
# backslash, spaces, a tab and a newline.
TRICKY_VALUE = "a 'single' \"double\" $HOME `date` \\back\tslash\nsecond  line $"


# ----- setup --------------------------------------------------------------------------------


def _unavailable_reason() -> Optional[str]:
    """Return why the cross-user tests cannot run on this host, or None."""
    if not sys.platform.startswith("linux"):
        return "cross-user tests need Linux"
    if os.geteuid() != 0:
        return "cross-user tests need root to switch to the host user (.ci/run runs them as root)"
    for program in (SUDO, SETPRIV, SYSTEM_PYTHON):
        if not os.access(program, os.X_OK):
            return f"cross-user tests need {program}; install it (see .ci/run)"
    for user in (HOST_USER, JOB_USER):
        try:
            pwd.getpwnam(user)
        except KeyError:
            return f"cross-user tests need the OS user {user!r}; create it as .ci/run does"
    try:
        members = grp.getgrnam(SHARED_GROUP).gr_mem
    except KeyError:
        return f"cross-user tests need the OS group {SHARED_GROUP!r}; create it as .ci/run does"
    missing = [user for user in (HOST_USER, JOB_USER) if user not in members]
    if missing:
        return f"users {missing} are not members of group {SHARED_GROUP!r}; add them as .ci/run does"
    check = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import ensurepip, venv"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    if check.returncode != 0:
        return f"{SYSTEM_PYTHON} cannot create a venv; install python3-venv"
    return None


@dataclass(frozen=True)
class UserSetup:
    """What the module fixture prepared for the scenarios."""

    python: Path
    """The interpreter of the world-readable venv that has this package installed."""
    script: Path
    """The scenario script, copied to a directory every user can read."""
    base: Path
    """A directory under /tmp for this module's files, removed afterwards."""


def _source_digest() -> str:
    digest = hashlib.sha256()
    files = [path for path in (REPO_ROOT / "src").rglob("*") if path.is_file()]
    files = [path for path in files if "__pycache__" not in path.parts and path.suffix != ".pyc"]
    for path in sorted([*files, REPO_ROOT / "pyproject.toml"]):
        digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _make_readable(top: Path) -> None:
    """Give every user read access to ``top``, and search access to its directories."""
    for directory, _, files in os.walk(top):
        os.chmod(directory, os.stat(directory).st_mode | 0o555)
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                mode = os.stat(path).st_mode
                os.chmod(path, mode | 0o444 | (0o111 if mode & 0o100 else 0))


def _ensure_venv() -> Path:
    """Return the python of a world-readable venv with this package, building it if needed.

    A file lock serializes builds of concurrent test runs. The ``.complete`` marker is
    written last, so a venv whose build was interrupted is rebuilt.
    """
    VENV_PARENT.mkdir(parents=True, exist_ok=True)
    os.chmod(VENV_PARENT, 0o755)
    venv = VENV_PARENT / f"venv-{_source_digest()}"
    with open(VENV_PARENT / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / ".complete").exists():
            os.utime(venv)  # Marks it as used, see _remove_stale_venvs().
            return venv / "bin" / "python"
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(venv)], check=True)
        install = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-input"]
        subprocess.run([*install, "openjd-model >= 0.9, < 0.10", "pyyaml >= 6", str(REPO_ROOT)], check=True)
        _make_readable(venv)
        (venv / ".complete").touch()
        _remove_stale_venvs(keep=venv)
    return venv / "bin" / "python"


def _remove_stale_venvs(keep: Path) -> None:
    now = time.time()
    for other in VENV_PARENT.glob("venv-*"):
        if other != keep and now - other.stat().st_mtime > STALE_VENV_SECONDS:
            shutil.rmtree(other, ignore_errors=True)


def _ensure_no_sudo_user() -> None:
    """Create the user without a sudoers rule, in the shared group, unless it exists."""
    try:
        pwd.getpwnam(NO_SUDO_USER)
        return
    except KeyError:
        pass
    command = ["useradd", "--no-create-home", "--shell", "/bin/sh", "--groups", SHARED_GROUP, NO_SUDO_USER]
    created = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # A concurrent test run may have created the user meanwhile.
    if created.returncode != 0 and created.returncode != 9:  # 9: the user name already exists
        raise RuntimeError(f"Could not create user {NO_SUDO_USER!r}: {created.stdout.strip()}")


def _host_owned_dir(parent: Path, prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    shutil.chown(path, HOST_USER, HOST_USER)
    os.chmod(path, 0o755)
    return path


@pytest.fixture(scope="module")
def setup() -> Iterator[UserSetup]:
    reason = _unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    _ensure_no_sudo_user()
    python = _ensure_venv()
    base = Path(tempfile.mkdtemp(prefix="openjd-users-test-", dir="/tmp"))
    os.chmod(base, 0o755)
    script = base / SCENARIO_SCRIPT
    shutil.copyfile(TESTS_DIR / SCENARIO_SCRIPT, script)
    os.chmod(script, 0o644)
    try:
        yield UserSetup(python=python, script=script, base=base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def session_root(setup: UserSetup) -> Path:
    """A session root directory that the host user owns (the default /tmp/OpenJD is root's)."""
    return _host_owned_dir(setup.base, "root-")


# ----- a cgroup delegated to the host user --------------------------------------------------


def _own_cgroup() -> Optional[str]:
    """Return this process's cgroup v2 path, relative to the cgroup2 mount."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:].strip()
    return None


def _below_cgroup(cgroup_path: Optional[str], delegated: Path) -> bool:
    """Return whether the cgroup v2 path of a process lies below the ``delegated`` cgroup."""
    own = _own_cgroup() or "/"
    return cgroup_path is not None and cgroup_path.startswith(f"{own.rstrip('/')}/{delegated.name}/")


def _own_cgroup_dir() -> tuple[Optional[Path], str]:
    """Return this process's cgroup v2 directory, or None and the reason."""
    own = _own_cgroup()
    if own is None:
        return None, "this process is in no cgroup v2 hierarchy"
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        separator = fields.index("-")
        if fields[separator + 1] != "cgroup2" or fields[3] != "/":
            continue
        directory = Path(fields[4]) / own.lstrip("/")
        if directory.is_dir():
            return directory, ""
    return None, "no cgroup2 file system that contains this process is mounted"


def _cgroup_pids(top: Path) -> list[int]:
    pids: list[int] = []
    for directory, _, _ in os.walk(top):
        try:
            pids += [int(pid) for pid in Path(directory, "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            pass
    return pids


def _child_cgroups(top: Path) -> list[str]:
    """Return the cgroups below ``top`` that the session left behind."""
    return sorted(str(path.relative_to(top)) for path in top.rglob("*") if path.is_dir())


def _remove_cgroup_tree(top: Path) -> None:
    """Kill what is left in ``top`` (all started by this test) and remove its directories."""
    for pid in _cgroup_pids(top):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while _cgroup_pids(top) and time.monotonic() < deadline:
        time.sleep(0.05)
    for directory, _, _ in os.walk(top, topdown=False):
        try:
            os.rmdir(directory)
        except FileNotFoundError:
            pass


@pytest.fixture
def delegated_cgroup() -> Iterator[Path]:
    """A cgroup below this process's own, owned by the host user as systemd delegates one."""
    parent, reason = _own_cgroup_dir()
    if parent is None:
        pytest.skip(f"cgroup tracking needs cgroup v2: {reason}")
    if not os.access(parent / "cgroup.procs", os.W_OK):
        pytest.skip(f"cgroup tracking needs a writable cgroup v2, and {parent}/cgroup.procs is not writable")
    path = parent / f"openjd-users-test-{os.getpid()}-{secrets.token_hex(3)}"
    path.mkdir()
    try:
        for item in (path, path / "cgroup.procs", path / "cgroup.subtree_control", path / "cgroup.threads"):
            os.chown(item, pwd.getpwnam(HOST_USER).pw_uid, -1)
        yield path
    finally:
        _remove_cgroup_tree(path)


@pytest.fixture(params=["process-group", "cgroup"])
def tracking(request: pytest.FixtureRequest) -> tuple[str, Optional[Path]]:
    """The process-tracking mechanism, and the delegated cgroup for ``cgroup``."""
    if request.param == "cgroup":
        return "cgroup", request.getfixturevalue("delegated_cgroup")
    return "process-group", None


# ----- running a scenario -------------------------------------------------------------------


def _host_env(extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    host = pwd.getpwnam(HOST_USER)
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": host.pw_dir,
        "USER": HOST_USER,
        "LOGNAME": HOST_USER,
        "LANG": "C.UTF-8",
        HOST_MARKER_VAR: "visible-to-the-host-only",
    }
    env.update(extra or {})
    return env


def _as_host_user(command: list[str], cgroup: Optional[Path]) -> list[str]:
    """Return ``command`` run as the host user, first moved into ``cgroup`` while still root."""
    host = pwd.getpwnam(HOST_USER)
    switched = [SETPRIV, f"--reuid={host.pw_uid}", f"--regid={host.pw_gid}", "--init-groups", "--", *command]
    if cgroup is None:
        return switched
    return ["/bin/sh", "-c", 'echo 0 > "$0/cgroup.procs" && exec "$@"', str(cgroup), *switched]


def run_scenario(
    setup: UserSetup,
    root: Path,
    name: str,
    args: Optional[Mapping[str, Any]] = None,
    *,
    tracking: tuple[str, Optional[Path]] = ("process-group", None),
    env: Optional[Mapping[str, str]] = None,
) -> dict[str, Any]:
    """Run one scenario of ``users_scenarios.py`` as the host user and return its JSON result."""
    mechanism, cgroup = tracking
    full_args = {"root": str(root), "job_user": JOB_USER, "group": SHARED_GROUP, "python": SYSTEM_PYTHON}
    full_args.update(args or {})
    command = [str(setup.python), str(setup.script), name]
    try:
        completed = subprocess.run(
            _as_host_user(command, cgroup),
            input=json.dumps(full_args),
            capture_output=True,
            text=True,
            errors="replace",
            cwd=root,
            env=_host_env({TRACKING_ENV_VAR: mechanism, **(env or {})}),
            timeout=SCENARIO_TIMEOUT,
        )
    except subprocess.TimeoutExpired as err:
        output = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else err.stdout or ""
        _kill_started(_announced_pids(output))
        pytest.fail(f"Scenario {name!r} did not end within {SCENARIO_TIMEOUT} s.\nstdout:\n{output}")
    lines = completed.stdout.splitlines()
    leftover = _kill_started(_announced_pids(completed.stdout))
    for line in reversed(lines):
        if line.startswith(RESULT_PREFIX):
            result: dict[str, Any] = json.loads(line[len(RESULT_PREFIX) :])
            assert result["process_user"] == HOST_USER
            result["leftover"] = leftover
            return result
    pytest.fail(
        f"Scenario {name!r} printed no result (exit code {completed.returncode}).\n"
        f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    )


def _announced_pids(output: str) -> list[int]:
    """Return the job-user pids that a scenario printed on ``OPENJD-USERS-PID`` lines."""
    return [int(line[len(PID_PREFIX) :]) for line in output.splitlines() if line.startswith(PID_PREFIX)]


def _is_running_job_process(pid: int) -> bool:
    """Return whether ``pid`` runs, is not a zombie, and belongs to the job user."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        uid = os.stat(f"/proc/{pid}").st_uid
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = text[text.rindex(")") + 2 :].split()[0]
    return state not in ("Z", "X") and uid == pwd.getpwnam(JOB_USER).pw_uid


def _kill_started(pids: list[int]) -> list[int]:
    """Send SIGKILL to those of ``pids`` (processes this test started) that still run.

    Returns the pids that were still running.
    """
    running = [pid for pid in pids if _is_running_job_process(pid)]
    for pid in running:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return running


def _log_text(result: Mapping[str, Any]) -> str:
    return "\n".join(result["log"])


def _primary_group(user: str) -> str:
    return grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name


def _info(mode: int, owner: str = HOST_USER, group: str = SHARED_GROUP) -> dict[str, Any]:
    return {"mode": mode, "owner": owner, "group": group}


# ----- identity and environment -------------------------------------------------------------


def test_action_runs_as_job_user(setup: UserSetup, session_root: Path) -> None:
    result = run_scenario(setup, session_root, "identity", {"value": TRICKY_VALUE, "host_marker": HOST_MARKER_VAR})

    assert result["task"]["state"] == "SUCCESS", _log_text(result)
    report = result["reports"][-1]
    job = pwd.getpwnam(JOB_USER)
    groups = sorted(os.getgrouplist(JOB_USER, job.pw_gid))
    assert report["id_u"] == str(job.pw_uid)
    assert report["id_g"] == str(job.pw_gid)
    assert sorted(int(gid) for gid in report["id_G"].split()) == groups
    assert grp.getgrnam(SHARED_GROUP).gr_gid in groups


def test_action_environment_crosses_users(setup: UserSetup, session_root: Path) -> None:
    result = run_scenario(setup, session_root, "identity", {"value": TRICKY_VALUE, "host_marker": HOST_MARKER_VAR})

    assert result["enter"]["state"] == "SUCCESS", _log_text(result)
    assert result["task"]["state"] == "SUCCESS", _log_text(result)
    report = result["reports"][-1]
    assert report["env"]["OPENJD_TEST_OS_VAR"] == TRICKY_VALUE
    assert report["env"]["OPENJD_TEST_ENV_VAR"] == TRICKY_VALUE
    assert report["env"]["OPENJD_SESSION_WORKING_DIR"] == result["working_dir"]
    assert report["cwd"] == result["working_dir"]
    assert result["host_marker"] is not None, "the host process lacks the variable, so the check proves nothing"
    assert report["env"][HOST_MARKER_VAR] is None


# ----- files --------------------------------------------------------------------------------


def test_session_files_modes_and_owners(setup: UserSetup, session_root: Path) -> None:
    result = run_scenario(setup, session_root, "files")

    assert result["enter"]["state"] == "SUCCESS", _log_text(result)
    assert result["working_dir"] == _info(0o770)
    assert result["files_dir"] == _info(0o770)
    run_file, plain, tool, mapping = result["paths"]
    infos = dict(zip(("run", "plain", "tool", "mapping"), result["infos"]))
    assert infos["plain"] == _info(0o660), plain
    assert infos["run"] == _info(0o660), run_file
    assert infos["tool"] == _info(0o770), tool
    assert infos["mapping"] == _info(0o660), mapping


def test_launch_script_private_and_removed(setup: UserSetup, session_root: Path) -> None:
    result = run_scenario(setup, session_root, "files")

    assert result["ready"], _log_text(result)
    scripts = result["scripts_while_running"]
    assert len(scripts) == 1, scripts
    (info,) = scripts.values()
    assert info["mode"] & stat.S_IRWXO == 0, oct(info["mode"])
    assert info["owner"] == HOST_USER
    assert info["group"] == SHARED_GROUP
    assert result["scripts_after"] == {}


def test_job_user_cannot_read_private(setup: UserSetup, session_root: Path) -> None:
    result = run_scenario(setup, session_root, "private")

    assert result["host_can_read"]
    assert result["file"] == _info(0o600, group=_primary_group(HOST_USER))
    assert result["dir"] == _info(0o700, group=_primary_group(HOST_USER))
    assert result["task"]["state"] == "FAILED"
    assert result["task"]["exit_code"] == 1
    assert "Permission denied" in _log_text(result)


def test_redacted_secret_not_exposed(setup: UserSetup, session_root: Path) -> None:
    secret = f"secret-{secrets.token_hex(12)}"
    result = run_scenario(setup, session_root, "redacted", {"secret": secret})

    assert result["enter"]["state"] == "SUCCESS", _log_text(result)
    assert result["ready"], _log_text(result)
    assert result["task"]["state"] == "SUCCESS", _log_text(result)
    assert result["tag_in_ps"], "ps did not show the task's command line, so the check below proves nothing"
    assert result["secret_in_ps"] == []
    assert result["world_readable"], "no world-readable file found: the working directory was not walked"
    assert [path for path, leaked in result["world_readable"].items() if leaked] == []
    assert result["secret_in_log"] == []


# ----- cleanup ------------------------------------------------------------------------------


def test_cleanup_removes_job_user_files(setup: UserSetup, session_root: Path) -> None:
    result = run_scenario(setup, session_root, "cleanup")

    assert result["task"]["state"] == "SUCCESS", _log_text(result)
    job_files = result["job_files"]
    assert job_files["private"] == _info(0o700, owner=JOB_USER, group=_primary_group(JOB_USER))
    assert job_files["file-ro.txt"] == _info(0o400, owner=JOB_USER, group=_primary_group(JOB_USER))
    assert job_files["empty-read-only"] == _info(0o500, owner=JOB_USER, group=_primary_group(JOB_USER))
    assert not result["working_dir_exists"], _log_text(result)
    assert "Permission denied" not in _log_text(result)
    assert result["state"] == "ENDED"


def test_cleanup_removes_read_only_tree(setup: UserSetup, session_root: Path) -> None:
    result = run_scenario(setup, session_root, "cleanup", {"read_only_tree": True})

    assert result["task"]["state"] == "SUCCESS", _log_text(result)
    assert result["job_files"]["read-only"] == _info(0o500, owner=JOB_USER, group=_primary_group(JOB_USER))
    assert "Permission denied" not in _log_text(result)
    assert not result["working_dir_exists"], _log_text(result)


def test_cleanup_kills_job_daemon(setup: UserSetup, session_root: Path, tracking: tuple[str, Optional[Path]]) -> None:
    # Process-group tracking finds a background process through its session id, so the
    # process must stay in the action's session. It cannot find a process that started a
    # new session after its parent exited, but a cgroup keeps even that one.
    daemon_setsid = tracking[0] == "cgroup"
    result = run_scenario(setup, session_root, "cleanup", {"daemon_setsid": daemon_setsid}, tracking=tracking)

    assert result["enter"]["state"] == "SUCCESS", _log_text(result)
    assert result["daemon_pid"] is not None, _log_text(result)
    if tracking[1] is not None:
        assert _below_cgroup(result["daemon_cgroup"], tracking[1]), result["daemon_cgroup"]
        assert _child_cgroups(tracking[1]) == []
    assert result["daemon_running"] == [], _log_text(result)
    assert result["leftover"] == []
    assert f"left running: [{result['daemon_pid']}]" in _log_text(result)


# ----- cancel, timeout, notify --------------------------------------------------------------


def _check_tree_ended(result: Mapping[str, Any], tracking: tuple[str, Optional[Path]]) -> None:
    """Check that every process of the cancel scenario's tree ended, by the chosen mechanism."""
    pids = result["pids"]
    assert set(pids) == {"main", "child", "grandchild"}
    assert sorted(result["running_before"]) == sorted(pids.values())
    if tracking[1] is not None:
        for name, cgroup in result["cgroups"].items():
            assert _below_cgroup(cgroup, tracking[1]), (name, cgroup)
        assert _child_cgroups(tracking[1]) == []
    else:
        # The host user may not signal job-user processes itself, so it runs kill through sudo.
        sudo_kills = [
            line
            for line in result["log"]
            if line.startswith("INTERRUPT: Running: /") and "/sudo " in line and "/kill -s KILL" in line
        ]
        assert sudo_kills, _log_text(result)
    assert result["running_after"] == [], _log_text(result)
    assert result["leftover"] == []
    assert not result["working_dir_exists"]


def test_terminate_cancel_kills_tree(
    setup: UserSetup, session_root: Path, tracking: tuple[str, Optional[Path]]
) -> None:
    result = run_scenario(setup, session_root, "cancel", {"mode": "terminate"}, tracking=tracking)

    assert result["ready"], _log_text(result)
    assert result["task"]["state"] == "CANCELED", _log_text(result)
    _check_tree_ended(result, tracking)


def test_timeout_kills_tree(setup: UserSetup, session_root: Path, tracking: tuple[str, Optional[Path]]) -> None:
    result = run_scenario(setup, session_root, "cancel", {"mode": "timeout", "timeout": 3}, tracking=tracking)

    assert result["ready"], _log_text(result)
    assert result["task"]["state"] == "TIMEOUT", _log_text(result)
    _check_tree_ended(result, tracking)


def test_notify_then_terminate_across_users(
    setup: UserSetup, session_root: Path, tracking: tuple[str, Optional[Path]]
) -> None:
    result = run_scenario(setup, session_root, "cancel", {"mode": "notify", "notify_period": 2}, tracking=tracking)

    assert result["ready"], _log_text(result)
    assert result["task"]["state"] == "CANCELED", _log_text(result)
    marker = result["term_marker"]
    assert marker is not None, "the SIGTERM handler of the job-user process did not run:\n" + _log_text(result)
    assert "NotifyEnd" in json.loads(marker)
    assert result["cancel_info"] == _info(0o660)
    _check_tree_ended(result, tracking)


# ----- no sudo rule, helpers from fixed directories, case 024 -------------------------------


def test_missing_sudo_rule_fails_action(setup: UserSetup, session_root: Path) -> None:
    result = run_scenario(setup, session_root, "no_sudo_rule", {"no_sudo_user": NO_SUDO_USER})

    assert result["enter"]["state"] == "FAILED", _log_text(result)
    assert result["enter"]["fail_message"] is not None, _log_text(result)
    assert f"{HOST_USER} ALL=({NO_SUDO_USER}) NOPASSWD: ALL" in result["enter"]["fail_message"]
    assert result["state_after_enter"] == "READY_ENDING"
    assert result["exit"] is not None
    assert result["state_after_exit"] == "READY_ENDING"
    assert result["state_after_cleanup"] == "ENDED"
    assert not result["working_dir_exists"], _log_text(result)


FAKE_HELPER = """#!/bin/sh
echo "$0 $*" >> {marker}
exit 1
"""


def test_helpers_ignore_fake_path(setup: UserSetup, session_root: Path) -> None:
    fake_bin = setup.base / f"fake-bin-{secrets.token_hex(3)}"
    fake_bin.mkdir(mode=0o755)
    marker_dir = _host_owned_dir(setup.base, "marker-")
    os.chmod(marker_dir, 0o777)
    marker = marker_dir / "used"
    for name in ("sudo", "kill", "rm"):
        helper = fake_bin / name
        helper.write_text(FAKE_HELPER.format(marker=marker))
        os.chmod(helper, 0o755)
    path = f"{fake_bin}:/usr/bin:/bin"

    result = run_scenario(setup, session_root, "cancel", {"mode": "terminate", "job_path": path}, env={"PATH": path})

    assert result["which_sudo"] == str(fake_bin / "sudo"), "the fake sudo was not first on PATH"
    assert result["which_kill"] == str(fake_bin / "kill")
    assert result["task"]["state"] == "CANCELED", _log_text(result)
    assert not marker.exists(), marker.read_text()
    _check_tree_ended(result, ("process-group", None))


def test_case_024_cross_user_cleanup(setup: UserSetup) -> None:
    case_dir = CASES_DIR / "024-cross-user-cleanup"
    if not (case_dir / "case.py").exists():
        pytest.skip(f"case 024 not found at {case_dir}")
    # The repository and shared/ may sit in a directory that the host user cannot read.
    copy = setup.base / f"cases-{secrets.token_hex(3)}"
    shutil.copytree(case_dir, copy / case_dir.name)
    shutil.copy(CASES_DIR / "_harness.py", copy / "_harness.py")
    _make_readable(copy)
    tmpdir = _host_owned_dir(setup.base, "case-tmp-")

    completed = subprocess.run(
        _as_host_user([str(setup.python), str(copy / case_dir.name / "case.py")], None),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        cwd=tmpdir,
        env=_host_env(
            {
                "OPENJD_CASE_JOB_USER": JOB_USER,
                "OPENJD_CASE_JOB_GROUP": SHARED_GROUP,
                # The default session root /tmp/OpenJD may belong to root, and TMPDIR moves it.
                "TMPDIR": str(tmpdir),
                TRACKING_ENV_VAR: "process-group",
            }
        ),
        timeout=SCENARIO_TIMEOUT,
    )

    assert completed.returncode == 0, completed.stdout
    assert "PASS" in completed.stdout
