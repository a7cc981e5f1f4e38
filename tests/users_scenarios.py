"""Scenarios for ``test_users.py``, run in a child process as the unprivileged host user.

Usage: ``python users_scenarios.py SCENARIO < JSON_ARGS``. The arguments come on standard
input, so that no secret appears in a command line. ``test_users.py`` starts this file
as the host user with an interpreter that can import ``openjd.sessions`` and
``openjd.model``. Each scenario drives one ``Session`` whose ``user`` is the job user.
At the end it prints one line, ``OPENJD-USERS-RESULT`` followed by a JSON object. The
object contains action statuses, the ``openjd.sessions`` log messages, file modes and
owners, and the pids that actions wrote.
Before that, it prints ``OPENJD-USERS-PID`` lines with the pids of job-user processes that
it learns about, so that the test process, running as root, can kill those that outlive
the scenario even when the scenario fails. The test process checks the result.

Arguments common to every scenario: ``root`` (a session root directory that the host user
owns), ``job_user``, ``group`` (shared by the host and job users) and ``python`` (the
interpreter that actions run, readable by the job user). The environment variable
``OPENJD_SESSIONS_PROCESS_TRACKING`` chooses the process-tracking mechanism.

Actions run ``python`` with an embedded file, because template arguments cannot hold
newlines. Actions report values on lines starting with ``REPORT``.
"""

from __future__ import annotations

import grp
import hashlib
import json
import logging
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Optional

from openjd.model import (
    Job,
    RevisionExtensions,
    SpecificationRevision,
    create_job,
    decode_job_template,
    preprocess_job_parameters,
)
from openjd.model.v2023_09 import Environment, StepScript

from openjd.sessions import LOG, ActionStatus, PathFormat, PathMappingRule, PosixSessionUser, Session, SessionState

RESULT_PREFIX = "OPENJD-USERS-RESULT "
PID_PREFIX = "OPENJD-USERS-PID "
# Upper bound for anything a scenario waits for. It only guards against hangs.
HANG_GUARD = 40.0
# Time that SIGKILLed processes get to disappear from /proc or become zombies.
EXIT_GRACE = 5.0

Args = Mapping[str, Any]


# ----- helpers ------------------------------------------------------------------------------


class LogRecorder(logging.Handler):
    """Keeps the message of every ``openjd.sessions`` record."""

    def __init__(self) -> None:
        super().__init__(level=logging.NOTSET)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def reports(self) -> list[Any]:
        """Return the JSON values that actions printed after ``REPORT``."""
        found = []
        for message in self.messages:
            if message.startswith("REPORT "):
                found.append(json.loads(message[len("REPORT ") :]))
        return found


def build_job(template: dict[str, Any], extensions: tuple[str, ...] = ()) -> Job:
    decoded = decode_job_template(template=template, supported_extensions=list(extensions))
    values = preprocess_job_parameters(
        job_template=decoded, job_parameter_values={}, job_template_dir=Path.cwd(), current_working_dir=Path.cwd()
    )
    return create_job(job_template=decoded, job_parameter_values=values)


def job_template(
    *, step: dict[str, Any], environments: Optional[list[dict[str, Any]]] = None, extensions: tuple[str, ...] = ()
) -> dict[str, Any]:
    template: dict[str, Any] = {
        "specificationVersion": "jobtemplate-2023-09",
        "name": "users-scenario",
        "steps": [{"name": "Step", "script": step}],
    }
    if extensions:
        template["extensions"] = list(extensions)
    if environments:
        template["jobEnvironments"] = environments
    return template


def python_script(args: Args, code: str, extra_args: list[str], **fields: Any) -> dict[str, Any]:
    """Return a step script whose ``onRun`` runs ``code`` from an embedded file."""
    return {
        "actions": {"onRun": {"command": args["python"], "args": ["{{Task.File.Run}}", *extra_args], **fields}},
        "embeddedFiles": [{"name": "Run", "type": "TEXT", "data": code}],
    }


def environment_of(job: Job, name: str) -> Environment:
    for environment in job.jobEnvironments or []:
        if environment.name == name:
            return environment
    raise KeyError(name)


def step_script_of(job: Job) -> StepScript:
    return job.steps[0].script


def new_session(args: Args, name: str, **kwargs: Any) -> Session:
    user = PosixSessionUser(kwargs.pop("user_name", args["job_user"]), group=args["group"])
    return Session(
        session_id=f"users-{name}",
        job_parameter_values={},
        user=user,
        session_root_directory=Path(args["root"]),
        **kwargs,
    )


def wait_done(session: Session) -> Optional[ActionStatus]:
    """Wait until the running action ended; return its status."""
    deadline = time.monotonic() + HANG_GUARD
    while session.state == SessionState.RUNNING:
        if time.monotonic() > deadline:
            raise TimeoutError(f"The action did not end within {HANG_GUARD} s: {session.action_status}")
        time.sleep(0.05)
    return session.action_status


def wait_for_file(path: Path, session: Session) -> bool:
    """Wait until ``path`` exists; return False if the action ended first."""
    deadline = time.monotonic() + HANG_GUARD
    while not path.exists():
        if session.state != SessionState.RUNNING or time.monotonic() > deadline:
            return path.exists()
        time.sleep(0.05)
    return True


def status_of(status: Optional[ActionStatus]) -> Optional[dict[str, Any]]:
    if status is None:
        return None
    return {"state": status.state.name, "exit_code": status.exit_code, "fail_message": status.fail_message}


def file_info(path: Path) -> Optional[dict[str, Any]]:
    """Return the mode, owner and group of ``path``, or None if it does not exist."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return {
        "mode": stat.S_IMODE(info.st_mode),
        "owner": pwd.getpwuid(info.st_uid).pw_name,
        "group": grp.getgrgid(info.st_gid).gr_name,
    }


def is_running(pid: int) -> bool:
    """Return whether ``pid`` exists and is not a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = text[text.rindex(")") + 2 :].split()[0]
    return state not in ("Z", "X")


def running_after_grace(pids: list[int]) -> list[int]:
    """Return the pids that still run after up to ``EXIT_GRACE`` seconds."""
    deadline = time.monotonic() + EXIT_GRACE
    while True:
        alive = [pid for pid in pids if is_running(pid)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def cgroup_of(pid: int) -> Optional[str]:
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    return next((line[3:] for line in lines if line.startswith("0::")), None)


def announce(pid: int) -> None:
    """Tell the test process about a job-user process to kill if it outlives the scenario."""
    sys.stdout.write(f"{PID_PREFIX}{pid}\n")
    sys.stdout.flush()


def launch_scripts(working_directory: Path) -> dict[str, Any]:
    return {path.name: file_info(path) for path in sorted(working_directory.glob("*.sh"))}


# ----- scenarios ----------------------------------------------------------------------------

REPORT_IDENTITY = """\
import json, os, subprocess, sys

def run(*argv):
    return subprocess.run(argv, stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()

names = sys.argv[1:]
report = {
    "id_u": run("id", "-u"),
    "id_g": run("id", "-g"),
    "id_G": run("id", "-G"),
    "env": {name: os.environ.get(name) for name in names},
    "cwd": os.getcwd(),
}
print("REPORT " + json.dumps(report))
"""


def scenario_identity(args: Args, recorder: LogRecorder) -> dict[str, Any]:
    """Report the identity and chosen variables of a task run as the job user."""
    value = args["value"]
    names = ["OPENJD_TEST_OS_VAR", "OPENJD_TEST_ENV_VAR", "OPENJD_SESSION_WORKING_DIR", args["host_marker"]]
    environment = {"name": "Vars", "variables": {"OPENJD_TEST_ENV_VAR": value}}
    job = build_job(job_template(step=python_script(args, REPORT_IDENTITY, names), environments=[environment]))
    session = new_session(args, "identity", os_env_vars={"OPENJD_TEST_OS_VAR": value})
    try:
        identifier = session.enter_environment(environment=environment_of(job, "Vars"))
        enter = status_of(wait_done(session))
        session.run_task(step_script=step_script_of(job), task_parameter_values={})
        task = status_of(wait_done(session))
        session.exit_environment(identifier=identifier)
        wait_done(session)
        return {
            "enter": enter,
            "task": task,
            "working_dir": str(session.working_directory),
            "host_marker": os.environ.get(args["host_marker"]),
        }
    finally:
        session.cleanup()


HOLD_UNTIL_GO = """\
import json, os, sys, time

working_dir = sys.argv[1]
open(os.path.join(working_dir, "ready"), "w").close()
deadline = time.monotonic() + 30
while not os.path.exists(os.path.join(working_dir, "go")) and time.monotonic() < deadline:
    time.sleep(0.05)
print("REPORT " + json.dumps(sys.argv[2:]))
"""


def scenario_files(args: Args, recorder: LogRecorder) -> dict[str, Any]:
    """Report modes and owners of the session's files, and of the launch script while it runs."""
    environment = {
        "name": "Files",
        "script": {
            "actions": {
                "onEnter": {
                    "command": args["python"],
                    "args": [
                        "{{Env.File.Run}}",
                        "{{Session.WorkingDirectory}}",
                        "{{Env.File.Run}}",
                        "{{Env.File.Plain}}",
                        "{{Env.File.Tool}}",
                        "{{Session.PathMappingRulesFile}}",
                    ],
                }
            },
            "embeddedFiles": [
                {"name": "Run", "type": "TEXT", "data": HOLD_UNTIL_GO},
                {"name": "Plain", "type": "TEXT", "data": "plain data\n"},
                {"name": "Tool", "type": "TEXT", "runnable": True, "data": "#!/bin/sh\necho tool\n"},
            ],
        },
    }
    job = build_job(job_template(step=python_script(args, "pass\n", []), environments=[environment]))
    rule = PathMappingRule(
        source_path_format=PathFormat.POSIX, source_path=Path("/mnt/src"), destination_path=Path("/mnt/dst")
    )
    session = new_session(args, "files", path_mapping_rules=[rule])
    working_dir = session.working_directory
    try:
        session.enter_environment(environment=environment_of(job, "Files"))
        ready = wait_for_file(working_dir / "ready", session)
        scripts_while_running = launch_scripts(working_dir)
        (working_dir / "go").touch()
        enter = status_of(wait_done(session))
        reports = recorder.reports()
        paths = reports[0] if reports else []
        return {
            "enter": enter,
            "ready": ready,
            "scripts_while_running": scripts_while_running,
            "scripts_after": launch_scripts(working_dir),
            "working_dir": file_info(working_dir),
            "files_dir": file_info(session.files_directory),
            "paths": paths,
            "infos": [file_info(Path(path)) for path in paths],
        }
    finally:
        session.cleanup()


def scenario_private(args: Args, recorder: LogRecorder) -> dict[str, Any]:
    """Let a job-user action read a file that is private to the host user."""
    private_dir = Path(args["root"]) / f"private-{secrets.token_hex(4)}"
    private_dir.mkdir(mode=0o700)
    os.chmod(private_dir, 0o700)
    secret_file = private_dir / "secret.txt"
    secret_file.write_text("host only\n")
    os.chmod(secret_file, 0o600)

    step = {"actions": {"onRun": {"command": "/bin/cat", "args": [str(secret_file)]}}}
    job = build_job(job_template(step=step))
    session = new_session(args, "private")
    try:
        session.run_task(step_script=step_script_of(job), task_parameter_values={})
        task = status_of(wait_done(session))
    finally:
        session.cleanup()
    return {
        "task": task,
        "host_can_read": secret_file.read_text() == "host only\n",
        "file": file_info(secret_file),
        "dir": file_info(private_dir),
    }


PUBLISH_SECRET = """\
print("openjd_redacted_env: OPENJD_TEST_SECRET=%s")
"""

USE_SECRET = """\
import hashlib, os, sys, time

expected_hash, working_dir, tag = sys.argv[1:4]
value = os.environ.get("OPENJD_TEST_SECRET", "")
open(os.path.join(working_dir, "ready"), "w").close()
deadline = time.monotonic() + 30
while not os.path.exists(os.path.join(working_dir, "go")) and time.monotonic() < deadline:
    time.sleep(0.05)
matches = hashlib.sha256(value.encode()).hexdigest() == expected_hash
print("secret matches: %s" % matches)
sys.exit(0 if matches else 1)
"""


def scenario_redacted(args: Args, recorder: LogRecorder) -> dict[str, Any]:
    """Look for a redacted secret in command lines and world-readable files while a task uses it."""
    secret = args["secret"]
    tag = f"users-tag-{secrets.token_hex(6)}"
    environment = {
        "name": "Secret",
        "script": {
            "actions": {"onEnter": {"command": args["python"], "args": ["{{Env.File.Run}}"]}},
            "embeddedFiles": [{"name": "Run", "type": "TEXT", "data": PUBLISH_SECRET % secret}],
        },
    }
    digest = hashlib.sha256(secret.encode()).hexdigest()
    step = python_script(args, USE_SECRET, [digest, "{{Session.WorkingDirectory}}", tag])
    extensions = ("REDACTED_ENV_VARS",)
    job = build_job(job_template(step=step, environments=[environment], extensions=extensions), extensions)
    revision = RevisionExtensions(spec_rev=SpecificationRevision.v2023_09, supported_extensions=list(extensions))
    session = new_session(args, "redacted", revision_extensions=revision)
    working_dir = session.working_directory
    try:
        session.enter_environment(environment=environment_of(job, "Secret"))
        enter = status_of(wait_done(session))
        session.run_task(step_script=step_script_of(job), task_parameter_values={})
        ready = wait_for_file(working_dir / "ready", session)
        command_lines = subprocess.run(
            ["/usr/bin/ps", "-eo", "args"], stdout=subprocess.PIPE, text=True, check=True
        ).stdout
        readable = world_readable_files(working_dir)
        (working_dir / "go").touch()
        task = status_of(wait_done(session))
    finally:
        session.cleanup()
    return {
        "enter": enter,
        "task": task,
        "ready": ready,
        "tag_in_ps": tag in command_lines,
        "secret_in_ps": [line for line in command_lines.splitlines() if secret in line],
        "world_readable": {str(path): secret.encode() in data for path, data in readable.items()},
        "secret_in_log": [message for message in recorder.messages if secret in message],
    }


def world_readable_files(top: Path) -> dict[Path, bytes]:
    """Return the contents of every file under ``top`` that any user may read."""
    found: dict[Path, bytes] = {}
    for directory, _, names in os.walk(top):
        for name in names:
            path = Path(directory, name)
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode) and info.st_mode & stat.S_IROTH:
                found[path] = path.read_bytes()
    return found


START_DAEMON = """\
import os, sys

working_dir, detach = sys.argv[1], sys.argv[2] == "yes"
pid = os.fork()
if pid == 0:
    if detach:
        os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.execv("/bin/sleep", ["sleep", "300"])
with open(os.path.join(working_dir, "daemon.pid"), "w") as stream:
    stream.write(str(pid))
"""

MAKE_FILES = """\
import os, sys

working_dir, read_only_tree = sys.argv[1], sys.argv[2] == "yes"
top = os.path.join(working_dir, "job-files")
os.makedirs(os.path.join(top, "private"))
for path in ("private/secret.txt", "file-ro.txt"):
    with open(os.path.join(top, path), "w") as stream:
        stream.write("data")
os.chmod(os.path.join(top, "private", "secret.txt"), 0o600)
os.chmod(os.path.join(top, "private"), 0o700)
os.chmod(os.path.join(top, "file-ro.txt"), 0o400)
os.mkdir(os.path.join(top, "empty-read-only"), 0o500)
if read_only_tree:
    os.makedirs(os.path.join(top, "read-only", "sub"))
    for path in ("read-only/file.txt", "read-only/sub/inner.txt"):
        with open(os.path.join(top, path), "w") as stream:
            stream.write("data")
    os.chmod(os.path.join(top, "read-only", "sub"), 0o500)
    os.chmod(os.path.join(top, "read-only"), 0o500)
"""


def scenario_cleanup(args: Args, recorder: LogRecorder) -> dict[str, Any]:
    """Leave job-user files and a background process behind, then clean up.

    With ``read_only_tree``, the files include a 0o500 directory that contains files and
    another 0o500 directory. With ``daemon_setsid``, the background process starts a new
    session, so only its cgroup still ties it to the action.
    """
    detach = "yes" if args.get("daemon_setsid") else "no"
    environment = {
        "name": "Daemon",
        "script": {
            "actions": {
                "onEnter": {
                    "command": args["python"],
                    "args": ["{{Env.File.Run}}", "{{Session.WorkingDirectory}}", detach],
                }
            },
            "embeddedFiles": [{"name": "Run", "type": "TEXT", "data": START_DAEMON}],
        },
    }
    read_only_tree = "yes" if args.get("read_only_tree") else "no"
    step = python_script(args, MAKE_FILES, ["{{Session.WorkingDirectory}}", read_only_tree])
    job = build_job(job_template(step=step, environments=[environment]))
    session = new_session(args, "cleanup")
    working_dir = session.working_directory
    try:
        session.enter_environment(environment=environment_of(job, "Daemon"))
        enter = status_of(wait_done(session))
        daemon_file = working_dir / "daemon.pid"
        daemon_pid = int(daemon_file.read_text()) if daemon_file.exists() else None
        if daemon_pid is not None:
            announce(daemon_pid)
        daemon_cgroup = cgroup_of(daemon_pid) if daemon_pid else None
        session.run_task(step_script=step_script_of(job), task_parameter_values={})
        task = status_of(wait_done(session))
        job_files = {
            name: file_info(working_dir / "job-files" / name)
            for name in ("private", "file-ro.txt", "empty-read-only", "read-only")
        }
    finally:
        session.cleanup()
    return {
        "enter": enter,
        "task": task,
        "job_files": job_files,
        "daemon_pid": daemon_pid,
        "daemon_cgroup": daemon_cgroup,
        "daemon_running": running_after_grace([daemon_pid]) if daemon_pid else [],
        "working_dir_exists": working_dir.exists(),
        "state": session.state.name,
    }


PROCESS_TREE = """\
import json, os, signal, sys, time

working_dir, mode = sys.argv[1], sys.argv[2]

def on_term(signum, frame):
    try:
        with open(os.path.join(working_dir, "cancel_info.json")) as stream:
            cancel_info = stream.read()
    except OSError as err:
        cancel_info = "unreadable: %s" % err
    with open(os.path.join(working_dir, "term-marker"), "w") as stream:
        stream.write(cancel_info)

if mode == "notify":
    signal.signal(signal.SIGTERM, on_term)

pid = os.fork()
if pid == 0:
    grandchild = os.fork()
    if grandchild == 0:
        os.setsid()
        os.execv("/bin/sleep", ["sleep", "300"])
    with open(os.path.join(working_dir, "grandchild.pid.tmp"), "w") as stream:
        stream.write(str(grandchild))
    os.rename(os.path.join(working_dir, "grandchild.pid.tmp"), os.path.join(working_dir, "grandchild.pid"))
    os.execv("/bin/sleep", ["sleep", "300"])
while not os.path.exists(os.path.join(working_dir, "grandchild.pid")):
    time.sleep(0.01)
with open(os.path.join(working_dir, "grandchild.pid")) as stream:
    grandchild = int(stream.read())
with open(os.path.join(working_dir, "pids.json"), "w") as stream:
    json.dump({"main": os.getpid(), "child": pid, "grandchild": grandchild}, stream)
open(os.path.join(working_dir, "ready"), "w").close()
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    time.sleep(0.2)
"""


def scenario_cancel(args: Args, recorder: LogRecorder) -> dict[str, Any]:
    """Run a job-user tree with a setsid grandchild and end it by cancel or timeout.

    ``mode`` is ``terminate`` (cancel with TERMINATE), ``notify`` (cancel with
    NOTIFY_THEN_TERMINATE; the main process handles SIGTERM and keeps running) or
    ``timeout`` (the action's timeout ends it).
    """
    mode = args["mode"]
    fields: dict[str, Any] = {}
    if mode == "notify":
        fields["cancelation"] = {"mode": "NOTIFY_THEN_TERMINATE", "notifyPeriodInSeconds": args["notify_period"]}
    else:
        fields["cancelation"] = {"mode": "TERMINATE"}
    if mode == "timeout":
        fields["timeout"] = args["timeout"]
    step = python_script(args, PROCESS_TREE, ["{{Session.WorkingDirectory}}", mode], **fields)
    job = build_job(job_template(step=step))
    os_env_vars = {"PATH": args["job_path"]} if args.get("job_path") else None
    session = new_session(args, f"cancel-{mode}", os_env_vars=os_env_vars)
    working_dir = session.working_directory
    result: dict[str, Any] = {"which_sudo": shutil.which("sudo"), "which_kill": shutil.which("kill")}
    try:
        session.run_task(step_script=step_script_of(job), task_parameter_values={})
        result["ready"] = wait_for_file(working_dir / "ready", session)
        pids = json.loads((working_dir / "pids.json").read_text()) if result["ready"] else {}
        for pid in pids.values():
            announce(pid)
        result["pids"] = pids
        result["cgroups"] = {name: cgroup_of(pid) for name, pid in pids.items()}
        result["running_before"] = [pid for pid in pids.values() if is_running(pid)]
        if mode != "timeout":
            session.cancel_action()
        result["task"] = status_of(wait_done(session))
        result["running_after"] = running_after_grace(list(pids.values()))
        marker = working_dir / "term-marker"
        result["term_marker"] = marker.read_text() if marker.exists() else None
        result["cancel_info"] = file_info(working_dir / "cancel_info.json")
        result["session_state"] = session.state.name
    finally:
        session.cleanup()
    result["working_dir_exists"] = working_dir.exists()
    return result


def scenario_no_sudo_rule(args: Args, recorder: LogRecorder) -> dict[str, Any]:
    """Run an environment as a user that the host user has no sudo rule for."""
    environment = {
        "name": "NoSudoRule",
        "script": {
            "actions": {
                "onEnter": {"command": "/bin/true"},
                "onExit": {"command": "/bin/true"},
            }
        },
    }
    job = build_job(job_template(step={"actions": {"onRun": {"command": "/bin/true"}}}, environments=[environment]))
    session = new_session(args, "no-sudo-rule", user_name=args["no_sudo_user"])
    working_dir = session.working_directory
    identifier = session.enter_environment(environment=environment_of(job, "NoSudoRule"))
    enter = status_of(wait_done(session))
    state_after_enter = session.state.name
    session.exit_environment(identifier=identifier)
    exit_status = status_of(wait_done(session))
    state_after_exit = session.state.name
    session.cleanup()
    return {
        "enter": enter,
        "state_after_enter": state_after_enter,
        "exit": exit_status,
        "state_after_exit": state_after_exit,
        "state_after_cleanup": session.state.name,
        "working_dir_exists": working_dir.exists(),
    }


SCENARIOS: dict[str, Callable[[Args, LogRecorder], dict[str, Any]]] = {
    "identity": scenario_identity,
    "files": scenario_files,
    "private": scenario_private,
    "redacted": scenario_redacted,
    "cleanup": scenario_cleanup,
    "cancel": scenario_cancel,
    "no_sudo_rule": scenario_no_sudo_rule,
}


def main() -> int:
    name = sys.argv[1]
    args = json.loads(sys.stdin.read())
    recorder = LogRecorder()
    LOG.addHandler(recorder)
    result = SCENARIOS[name](args, recorder)
    result["log"] = recorder.messages
    result["reports"] = recorder.reports()
    result["process_user"] = pwd.getpwuid(os.geteuid()).pw_name
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
