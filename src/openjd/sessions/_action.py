"""The action runner: one action from its model to its final state.

``ActionRunner.start()`` runs in the caller's thread: it writes embedded files, resolves
the command, arguments, runtime limit and cancel method, and starts the process. Failures
up to that point end the action FAILED before ``start()`` returns. Then one thread per
action streams output, applies ``openjd_*`` messages, enforces the runtime limit and the
notify period of a cancel, and reports the final state. Results go up to the session
through one callback that receives ``RunnerEvent`` values.
"""

from __future__ import annotations

import errno
import logging
import shlex
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Optional, Union

from ._files import utc_timestamp, write_cancel_info
from ._logging import LogContent, SessionLogger
from ._messages import Redactor
from ._output_handler import OutputHandler
from ._posix_user import ActionLauncher, SudoRefusedError, kill_as_user, launch_argv, write_launch_script
from ._prepare import ActionInput, PrelaunchError, prepare_action
from ._process import NOTIFY_SIGNAL, ActionProcess, ProcessRequest, build_process_env, prepare_standby
from ._proctree import KillPermissionError, SessionProcesses
from ._session_user import SessionUser
from ._threads import start_thread
from ._types import ActionState, ActionStatus

__all__ = ("ActionRunner", "EnvChanged", "RunnerEvent", "StatusChanged")

_DRAIN_FIRST_WAIT = 1.0
_DRAIN_GRACE = 5.0
_SUDO_KILL_ROUNDS = 5  # sudo kill, then rescan for processes forked meanwhile


@dataclass(frozen=True)
class StatusChanged:
    """The action's status changed; ``final`` is True exactly once, at the end."""

    status: ActionStatus
    final: bool = False


@dataclass(frozen=True)
class EnvChanged:
    """An environment action set (``value`` is a str) or unset (None) a variable."""

    name: str
    value: Optional[str]


RunnerEvent = Union[StatusChanged, EnvChanged]


@dataclass
class _Cancel:
    mark_failed: bool = False
    timed_out: bool = False  # The runtime limit issued the first cancel.
    grace_deadline: Optional[float] = None


class ActionRunner:
    """Runs one action and owns its status until the final state is reported."""

    def __init__(
        self,
        *,
        logger: SessionLogger,
        redactor: Redactor,
        redaction_enabled: bool,
        processes: SessionProcesses,
        working_directory: Path,
        files_directory: Path,
        user: Optional[SessionUser],
        on_event: Callable[[RunnerEvent], None],
        on_secret: Callable[[], None],
        launcher: ActionLauncher,
    ) -> None:
        self._logger = logger
        self._on_secret = on_secret
        self._redactor = redactor
        self._processes = processes
        self._working_directory = working_directory
        self._files_directory = files_directory
        self._user = user
        self._on_event = on_event
        self._redaction_enabled = redaction_enabled

        self._launcher = launcher
        self._script: Optional[Path] = None
        self._starting_thread: Optional[threading.Thread] = None
        self._timers: list[threading.Timer] = []
        # A cancel that arrived before the process existed: (time_limit, mark_failed).
        self._pending_cancel: Optional[tuple[Optional[timedelta], bool]] = None
        self._lock = threading.RLock()
        self._done = threading.Event()
        self._process: Optional[ActionProcess] = None
        self._standby_request: Optional[ProcessRequest] = None
        self._thread: Optional[threading.Thread] = None
        self._cancel: Optional[_Cancel] = None
        self._notify_period = 0.0
        self._terminate_only = True
        self._timeout_deadline: Optional[float] = None
        self._state = ActionState.RUNNING
        self._progress: Optional[float] = None
        self._status_message: Optional[str] = None
        self._fail_message: Optional[str] = None
        self._exit_code: Optional[int] = None

    def __repr__(self) -> str:
        pid = self._process.pid if self._process is not None else None
        return f"<ActionRunner pid={pid} state={self._state.value}>"

    # ----- status -----------------------------------------------------------------------

    @property
    def status(self) -> ActionStatus:
        redact = self._redactor.redact if self._redactor.active else None
        status_message = self._status_message
        fail_message = self._fail_message
        if redact is not None:
            status_message = redact(status_message) if status_message is not None else None
            fail_message = redact(fail_message) if fail_message is not None else None
        return ActionStatus(
            state=self._state,
            progress=self._progress,
            status_message=status_message,
            fail_message=fail_message,
            exit_code=self._exit_code,
        )

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the final state was reported; return False on timeout."""
        return self._done.wait(timeout)

    def in_action_thread(self) -> bool:
        """Tell whether the caller runs on this action's thread, for example in a callback."""
        current = threading.current_thread()
        return current is self._thread or current is self._starting_thread

    def notify_status(self) -> None:
        self._on_event(StatusChanged(self.status))

    def set_progress(self, value: float) -> None:
        self._progress = value
        self.notify_status()

    def set_status_message(self, text: str) -> None:
        self._status_message = text
        self.notify_status()

    def set_fail_message(self, text: str, *, notify: bool = True) -> None:
        self._fail_message = text
        if notify:
            self.notify_status()

    def emit_env(self, name: str, value: Optional[str]) -> None:
        self._on_event(EnvChanged(name, value))

    # ----- start ------------------------------------------------------------------------

    def start(self, request: ActionInput) -> None:
        """Start the action; on a failure before launch, end it FAILED before returning."""
        if request.action is None and request.argv is None:
            self._finish(ActionState.SUCCESS)
            return
        self._logger.subsection_banner("Phase: Setup")
        try:
            prepared = prepare_action(
                request, files_directory=self._files_directory, user=self._user, logger=self._logger
            )
        except PrelaunchError as err:
            self._fail_before_launch(str(err))
            return
        if prepared.notify_period is not None:
            self._terminate_only = False
            self._notify_period = prepared.notify_period
        try:
            argv = self._command_for_user(prepared.argv, request)
        except (PrelaunchError, SudoRefusedError) as err:
            self._fail_before_launch(str(err))
            return

        handler = OutputHandler(
            self,
            self._logger,
            self._redactor,
            request.is_environment,
            self._redaction_enabled,
            self._on_secret,
        )
        process_request = ProcessRequest(argv=argv, env=build_process_env(request.env), cwd=self._working_directory)
        if self._pending_cancel is not None:
            self._log_running(argv)
            self._logger.info("The action was canceled before its process started.", content=LogContent.PROCESS_CONTROL)
            self._cancel = _Cancel(mark_failed=self._pending_cancel[1])
            self._finish(ActionState.FAILED if self._cancel.mark_failed else ActionState.CANCELED)
            return
        # The process starts before its records are logged, which is safe because its output
        # is read only on the action's thread, started below.
        try:
            process = ActionProcess(process_request, self._processes, handler.handle_lines)
        except (OSError, ValueError) as err:
            self._log_running(argv)
            self._logger.info(
                f"Process failed to start: {err}",
                content=LogContent.EXCEPTION_INFO | LogContent.PROCESS_CONTROL,
            )
            self._fail_before_launch(_start_failure_reason(argv[0], err), log=False)
            return
        self._log_running(argv)
        with self._lock:
            self._process = process
            pending = self._pending_cancel
        if self._launcher.sudo_user is None:
            self._standby_request = process_request
        handler.process = process
        if prepared.timeout is not None:
            self._timeout_deadline = time.monotonic() + prepared.timeout
        self._logger.info(f"Command started as pid: {process.pid}", content=LogContent.PROCESS_CONTROL)
        self._logger.info("Output:", content=LogContent.BANNER | LogContent.COMMAND_OUTPUT)

        self._starting_thread = threading.current_thread()  # The RUNNING callback runs here.
        try:
            self.notify_status()
        finally:
            self._starting_thread = None
        self._thread = start_thread(self._run, f"openjd-action-{process.pid}")
        if prepared.timeout is not None:
            self._start_deadline_timer(prepared.timeout)
        if pending is not None:
            self.cancel(time_limit=pending[0], mark_failed=pending[1])

    def _log_running(self, argv: list[str]) -> None:
        self._logger.subsection_banner("Phase: Running action")
        self._logger.info("Running command %s", _join(argv), content=LogContent.FILE_PATH | LogContent.PROCESS_CONTROL)

    def _command_for_user(self, argv: list[str], request: ActionInput) -> list[str]:
        """Return ``argv`` itself, or the sudo command that runs it as the session's user."""
        user = self._launcher.sudo_user
        if user is None:
            return argv
        self._launcher.check_sudo()
        try:
            self._script = write_launch_script(self._working_directory, request.env, argv, user)
        except OSError as err:
            raise PrelaunchError(f"Could not write the script that starts the action as {user.user}: {err}") from err
        self._logger.debug(
            f"Wrote the following script to {self._script}:\n{self._script.read_text()}",
            content=LogContent.FILE_PATH | LogContent.FILE_CONTENTS,
        )
        return launch_argv(user, self._script)

    def start_failed(self, reason: str) -> None:
        """End the action FAILED with ``reason`` before anything was started."""
        self._fail_before_launch(reason)

    def _fail_before_launch(self, reason: str, *, log: bool = True) -> None:
        if log:
            self._logger.info(f"openjd_fail: {reason}", content=LogContent.EXCEPTION_INFO)
        self.set_fail_message(reason)
        self._finish(ActionState.FAILED)

    # ----- cancel -----------------------------------------------------------------------

    def cancel(
        self,
        *,
        time_limit: Optional[timedelta] = None,
        mark_failed: bool = False,
        timed_out: bool = False,
    ) -> None:
        """Cancel with the action's method; return without waiting for the process."""
        with self._lock:
            process = self._process
            if self._done.is_set():
                return
            if process is None:
                # start() has not spawned the process yet; it applies the cancel itself.
                self._pending_cancel = (time_limit, mark_failed)
                return
            first = self._cancel is None
            if self._cancel is None:
                self._cancel = _Cancel(timed_out=timed_out)
            self._cancel.mark_failed = mark_failed
            now = datetime.now(timezone.utc)
            if self._terminate_only or (time_limit is not None and time_limit <= timedelta(0)):
                process.kill_group_early()
                if first or self._terminate_only:
                    method = "termination" if self._terminate_only else "notify then terminate"
                    self._logger.info(
                        f"Canceling subprocess {process.pid} via {method} method at {utc_timestamp(now)}.",
                        content=LogContent.PROCESS_CONTROL,
                    )
                self._terminate(process)
            else:
                self._notify(process, now, time_limit)
        process.wake()

    def _notify(self, process: ActionProcess, now: datetime, time_limit: Optional[timedelta]) -> None:
        assert self._cancel is not None
        grace = self._notify_period
        if time_limit is not None:
            grace = min(grace, time_limit.total_seconds())
        if self._cancel.grace_deadline is not None:
            grace = min(grace, max(0.0, self._cancel.grace_deadline - time.monotonic()))
        self._logger.info(
            f"Canceling subprocess {process.pid} via notify then terminate method at {utc_timestamp(now)}.",
            content=LogContent.PROCESS_CONTROL,
        )
        end = now + timedelta(seconds=grace)
        try:
            write_cancel_info(self._working_directory, end, self._user)
        except OSError as err:
            self._logger.warning(
                f"Could not write cancel_info.json to {self._working_directory}: {err}",
                content=LogContent.EXCEPTION_INFO | LogContent.FILE_PATH,
            )
        self._logger.info(f"Grace period ends at {utc_timestamp(end)}", content=LogContent.PROCESS_CONTROL)
        self._cancel.grace_deadline = time.monotonic() + grace
        self._start_deadline_timer(grace)
        if process.exited:
            return
        self._logger.info(
            f'INTERRUPT: Sending signal "term" to process {process.pid}', content=LogContent.PROCESS_CONTROL
        )
        try:
            process.send_signal(NOTIFY_SIGNAL)
        except OSError as err:
            self._logger.warning(
                f"INTERRUPT: Unable to send term to {process.pid}: {err}", content=LogContent.PROCESS_CONTROL
            )

    def _terminate(self, process: ActionProcess) -> None:
        if self._cancel is not None:
            self._cancel.grace_deadline = None
        self._logger.info(
            f'INTERRUPT: Sending signal "kill" to process group {process.pid}',
            content=LogContent.PROCESS_CONTROL,
        )
        try:
            killed = process.kill_tree()
        except KillPermissionError as err:
            killed = err.signalled + self._kill_as_user(process, err.denied)
        except OSError as err:
            self._logger.error(
                f"Cancelation could not send terminate signal to process {process.pid}: {err}",
                content=LogContent.PROCESS_CONTROL | LogContent.EXCEPTION_INFO,
            )
            return
        others = sorted(pid for pid in killed if pid != process.pid)
        if others:
            self._logger.info(
                f"INTERRUPT: Also killed {len(others)} descendant process(es) of pid {process.pid}: {others}",
                content=LogContent.PROCESS_CONTROL,
            )

    def _kill_as_user(self, process: ActionProcess, denied: list[int]) -> list[int]:
        """Kill processes of the session's user through sudo, rescanning for new ones."""
        user = self._launcher.sudo_user
        killed: list[int] = []
        for _ in range(_SUDO_KILL_ROUNDS):
            if not denied or user is None:
                break
            try:
                command, output = kill_as_user(user, denied)
            except (OSError, subprocess.SubprocessError, SudoRefusedError) as err:
                self._logger.error(
                    f"Cancelation could not kill process(es) {denied} of user {user.user}: {err}",
                    content=LogContent.PROCESS_CONTROL | LogContent.EXCEPTION_INFO,
                )
                return killed
            self._logger.info(f"INTERRUPT: Running: {_join(command)}", content=LogContent.PROCESS_CONTROL)
            if output:
                self._logger.debug(output, content=LogContent.PROCESS_CONTROL | LogContent.COMMAND_OUTPUT)
            killed.extend(denied)
            try:
                killed.extend(process.kill_tree())
                denied = []
            except KillPermissionError as err:
                killed.extend(err.signalled)
                denied = [pid for pid in err.denied if pid not in killed]
        if denied:
            self._logger.error(
                f"Cancelation could not kill process(es) {denied}: they keep running.",
                content=LogContent.PROCESS_CONTROL,
            )
        return killed

    # ----- the action thread ------------------------------------------------------------

    def _run(self) -> None:
        process = self._process
        assert process is not None
        exit_seen: Optional[float] = None
        warned = False
        try:
            while True:
                now = time.monotonic()
                self._check_deadlines(process, now)
                if process.exited and process.output_closed:
                    break
                if process.exited:
                    if exit_seen is None:
                        exit_seen = now
                        if self._cancel is not None:
                            with self._lock:
                                process.kill_tree()
                    if now >= exit_seen + _DRAIN_FIRST_WAIT and process.writers_gone():
                        # Only a backlog is left (a slow log handler); reading it reaches EOF.
                        process.pump(None)
                        continue
                    if not warned and now >= exit_seen + _DRAIN_FIRST_WAIT:
                        warned = True
                        self._logger.warning(
                            "Command exited but STDOUT stream is still open. Waiting gracetime of "
                            "5 seconds for the STDOUT stream to close before ending action.",
                            content=LogContent.PROCESS_CONTROL,
                        )
                    if now >= exit_seen + _DRAIN_FIRST_WAIT + _DRAIN_GRACE:
                        self._logger.warning(
                            "Gracetime of 5 seconds elapsed but the STDOUT stream is still open. Ending action.",
                            content=LogContent.PROCESS_CONTROL,
                        )
                        process.flush_partial_output()
                        break
                process.pump(self._next_wait(process, exit_seen, warned, now))
        except Exception:
            self._logger.exception(
                "Error running subprocess", content=LogContent.PROCESS_CONTROL | LogContent.EXCEPTION_INFO
            )
            with self._lock:
                process.kill_tree()
        self._end(process)
        # After the final callback, like the standby shells: the next action does not need
        # this cgroup, and nothing is left in it unless a killed process is still exiting.
        process.processes.release()
        if self._standby_request is not None and self._cancel is None:
            # After the final callback: the next action takes an older standby shell, so this
            # one has the time of a whole action to start.
            prepare_standby(self._standby_request, self._processes)

    def _check_deadlines(self, process: ActionProcess, now: float) -> None:
        """Apply the runtime limit and the end of a notify period once they have passed.

        The action's thread calls this between reads, and a timer thread calls it too, so
        that a callback that blocks the action's thread cannot hold off a deadline.
        """
        with self._lock:
            if self._done.is_set():
                return
            if self._timeout_deadline is not None and now >= self._timeout_deadline:
                self._timeout_deadline = None
                if not process.exited:
                    self._logger.info(
                        "TIMEOUT - Runtime limit reached at %s. Canceling action.",
                        utc_timestamp(datetime.now(timezone.utc)),
                        content=LogContent.PROCESS_CONTROL,
                    )
                    self.cancel(timed_out=True, mark_failed=self._cancel.mark_failed if self._cancel else False)
            cancel = self._cancel
            if cancel is not None and cancel.grace_deadline is not None and now >= cancel.grace_deadline:
                cancel.grace_deadline = None
                if not process.exited:
                    self._logger.info(
                        "Notify period ended. Terminate at %s",
                        utc_timestamp(datetime.now(timezone.utc)),
                        content=LogContent.PROCESS_CONTROL,
                    )
                    self._terminate(process)

    def _start_deadline_timer(self, delay: float) -> None:
        """Check the deadlines after ``delay`` seconds from a timer thread (see _check_deadlines)."""
        process = self._process
        if process is None:
            return
        timer = threading.Timer(delay, lambda: self._check_deadlines(process, time.monotonic()))
        timer.daemon = True
        timer.start()
        self._timers.append(timer)

    def _next_wait(
        self, process: ActionProcess, exit_seen: Optional[float], warned: bool, now: float
    ) -> Optional[float]:
        deadlines = []
        if self._timeout_deadline is not None:
            deadlines.append(self._timeout_deadline)
        if self._cancel is not None and self._cancel.grace_deadline is not None:
            deadlines.append(self._cancel.grace_deadline)
        if exit_seen is not None:
            deadlines.append(exit_seen + (_DRAIN_FIRST_WAIT + _DRAIN_GRACE if warned else _DRAIN_FIRST_WAIT))
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - now)

    def _end(self, process: ActionProcess) -> None:
        for timer in self._timers:
            timer.cancel()
        process.close()
        if self._script is not None:
            self._script.unlink(missing_ok=True)
        code = process.returncode
        assert code is not None
        self._logger.info(_exit_code_line(process.pid, code), content=LogContent.PROCESS_CONTROL)
        if process.usage is not None and self._logger.is_enabled_for(logging.DEBUG):
            usage = process.usage
            self._logger.debug(
                f"Resource usage of pid {process.pid} and the descendants it waited for: "
                f"user {usage.user_seconds:.3f} s, system {usage.system_seconds:.3f} s, "
                f"max RSS {usage.max_rss_kib} KiB",
                content=LogContent.PROCESS_CONTROL,
            )
        self._exit_code = code
        cancel = self._cancel
        if cancel is not None and cancel.mark_failed:
            state = ActionState.FAILED
        elif cancel is not None and cancel.timed_out:
            state = ActionState.TIMEOUT
        elif cancel is not None:
            state = ActionState.CANCELED
        elif code != 0:
            state = ActionState.FAILED
        else:
            state = ActionState.SUCCESS
        self._finish(state)

    def _finish(self, state: ActionState) -> None:
        with self._lock:
            self._state = state
            self._done.set()
        self._on_event(StatusChanged(self.status, final=True))

    def fail_with_cancel(self, message: str) -> None:
        """Fail the running action: record ``message`` and cancel it with its own method."""
        self.set_fail_message(message, notify=False)
        self.cancel(mark_failed=True)


def _join(argv: Sequence[str]) -> str:
    return shlex.join(argv)


def _start_failure_reason(command: str, err: Exception) -> str:
    if isinstance(err, FileNotFoundError) and err.filename in (None, command):
        return (
            f"Command not found: {command!r}. Check the command name, or give its absolute path "
            "or add its directory to PATH."
        )
    if isinstance(err, OSError) and err.errno == errno.E2BIG:
        return (
            "The command's arguments and environment variables together are larger than the OS "
            "accepts for a new process (E2BIG). Check the variables that environments set with "
            "openjd_env and pass large values in files instead."
        )
    if isinstance(err, PermissionError):
        return f"Command {command!r} could not be run: {err.strerror}. Check that the file is executable."
    return f"Process failed to start: {err}"


def _exit_code_line(pid: int, code: int) -> str:
    line = f"Process pid {pid} exited with code: {code} (unsigned) / {hex(code)} (hex)"
    if code >= 0x7FFFFFFF:
        signed = code & 0xFFFFFFFF
        if signed >= 0x80000000:
            signed -= 1 << 32
        line += f" / {signed} (signed)"
    return line
