"""The Session: state machine, environment stack, variable layering and symbol tables.

A session orchestrates; the action runner starts and watches processes, and the output
handler parses their messages. Every start method returns once the process runs (or
failed before running); the action's end arrives through the callback.
"""

from __future__ import annotations

import shlex
import subprocess
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Optional

from openjd.model import (
    FormatStringError,
    JobParameterValues,
    RevisionExtensions,
    SpecificationRevision,
    SymbolTable,
    TaskParameterSet,
)

from ._action import ActionRunner, EnvChanged, RunnerEvent, StatusChanged
from ._env_vars import EnvOverrides, build_overrides, check_os_env_vars, invalid_variable_reason
from ._files import (
    write_path_mapping_file,
)
from ._logging import LogContent, SessionLogger, register_redactor, unregister_redactor
from ._messages import Redactor
from ._path_mapping import PathMappingRule, sort_rules
from ._posix_user import ActionLauncher, SudoRefusedError, kill_as_user
from ._prepare import ActionInput
from ._proctree import KillPermissionError, SessionProcesses
from ._session_user import SessionUser
from ._symbols import build_symbol_table
from ._types import (
    ActionState,
    ActionStatus,
    EnvironmentIdentifier,
    EnvironmentModel,
    SessionCallbackType,
    SessionState,
    StepScriptModel,
)
from ._workdir import create_session_directories, delete_working_directory, log_host_info

__all__ = ("Session",)

_EXIT_DEFAULT_TIMEOUT = 300
_ENVIRONMENT_NOTIFY_PERIOD = 30
_TASK_NOTIFY_PERIOD = 120
_CLEANUP_CANCEL_WAIT = 60.0


@dataclass
class _EnteredEnvironment:
    identifier: EnvironmentIdentifier
    model: EnvironmentModel
    variables: dict[str, Optional[str]] = field(default_factory=dict)


class Session:
    """Runs the actions of one job on this host, one at a time, in a private directory.

    Start methods (``enter_environment``, ``exit_environment``, ``run_task``,
    ``run_subprocess``) return as soon as the process is running; the callback then
    receives ``RUNNING`` from the calling thread, message updates and the final state from
    the action's thread. A callback may start the next action. Methods other than
    ``cancel_action`` must not be called concurrently on one session.
    """

    def __init__(
        self,
        *,
        session_id: str,
        job_parameter_values: JobParameterValues,
        path_mapping_rules: Optional[list[PathMappingRule]] = None,
        retain_working_dir: bool = False,
        user: Optional[SessionUser] = None,
        callback: Optional[SessionCallbackType] = None,
        os_env_vars: Optional[dict[str, str]] = None,
        session_root_directory: Optional[Path] = None,
        revision_extensions: RevisionExtensions = RevisionExtensions(  # noqa: B008 (public default)
            spec_rev=SpecificationRevision.v2023_09, supported_extensions=[]
        ),
    ) -> None:
        """Create the working directory and get ready to run actions.

        Raises:
            RuntimeError: ``session_root_directory`` is not a directory, or the working
                directory could not be created (the session is then ``ENDED``).
            ValueError: an ``os_env_vars`` name or value cannot be given to a process.
        """
        self._session_id = session_id
        self._job_parameter_values: JobParameterValues = dict(job_parameter_values or {})
        self._rules = sort_rules(path_mapping_rules) if path_mapping_rules else None
        self._retain_working_dir = retain_working_dir
        self._user = user
        self._callback = callback
        self._revision_extensions = revision_extensions
        check_os_env_vars(os_env_vars)
        self._os_env_vars = dict(os_env_vars or {})
        if session_root_directory is not None and not session_root_directory.is_dir():
            raise RuntimeError(f"Ensure that the root directory ({session_root_directory}) exists and is a directory.")

        self._state = SessionState.READY
        self._ending_only = False
        self._cleaned_up = False
        self._environments: list[_EnteredEnvironment] = []
        self._running_environment: Optional[_EnteredEnvironment] = None
        self._runner: Optional[ActionRunner] = None
        self._action_status: Optional[ActionStatus] = None
        self._lock = threading.RLock()
        self._logger = SessionLogger(session_id)
        self._redactor = Redactor()
        self._launcher = ActionLauncher(user)
        self._processes = SessionProcesses(session_id)

        log_host_info(self._logger, session_id)
        try:
            self._working_directory, self._files_directory = create_session_directories(
                self._logger, session_root_directory, session_id, user
            )
        except RuntimeError:
            self._state = SessionState.ENDED
            self._processes.close()
            raise
        self._logger.debug(
            f"Process tracking: {self._processes.mechanism}"
            + (f" ({self._processes.cgroup_path})" if self._processes.cgroup_path else ""),
            content=LogContent.HOST_INFO | LogContent.PROCESS_CONTROL,
        )
        self._session_env = {
            **self._os_env_vars,
            "OPENJD_SESSION_WORKING_DIR": str(self._working_directory),
        }

    # ----- properties and context manager ----------------------------------------------

    @property
    def session_id(self) -> str:
        return self._session_id

    @property
    def working_directory(self) -> Path:
        return self._working_directory

    @property
    def files_directory(self) -> Path:
        return self._files_directory

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def action_status(self) -> Optional[ActionStatus]:
        return self._action_status

    @property
    def environments_entered(self) -> tuple[EnvironmentIdentifier, ...]:
        return tuple(env.identifier for env in self._environments)

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc_value: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        self.cleanup()

    def get_enabled_extensions(self) -> list[str]:
        """Return the extension names given in ``revision_extensions``."""
        return list(self._revision_extensions.extensions)

    @property
    def _redaction_enabled(self) -> bool:
        extensions = self._revision_extensions
        return "REDACTED_ENV_VARS" in extensions.extensions or (
            extensions.spec_rev.value > SpecificationRevision.v2023_09.value
        )

    # ----- environments ----------------------------------------------------------------

    def enter_environment(
        self,
        *,
        environment: EnvironmentModel,
        identifier: Optional[EnvironmentIdentifier] = None,
        os_env_vars: Optional[dict[str, str]] = None,
    ) -> EnvironmentIdentifier:
        """Run the environment's ``onEnter`` and keep its variables for later actions.

        Returns the identifier to pass to ``exit_environment``. The environment counts as
        entered even if ``onEnter`` fails, so it must still be exited.

        Raises:
            RuntimeError: the session is not ``READY``, or ``identifier`` is already entered.
            ValueError: an ``os_env_vars`` entry cannot be given to a process.
        """
        if self._state != SessionState.READY:
            raise RuntimeError("Session must be in the READY state to enter an Environment.")
        if identifier is not None and identifier in self.environments_entered:
            raise RuntimeError(f"Environment {identifier} has already been entered in this Session.")
        check_os_env_vars(os_env_vars)

        self._logger.section_banner(f"Entering Environment: {environment.name}")
        self._reset_action_status()
        identifier = identifier or f"{self._session_id}:{uuid.uuid4().hex}"
        entered = _EnteredEnvironment(identifier, environment)
        self._environments.append(entered)
        symtab = self._symbol_table(None)

        setting_error = self._resolve_variables(entered, symtab)
        env = self._overrides(os_env_vars, use_environments=True)
        script = environment.script
        action = script.actions.onEnter if script is not None else None
        request = ActionInput(
            kind="enter",
            env=env,
            action=action,
            symtab=symtab,
            embedded_files=(script.embeddedFiles or ()) if script is not None else (),
            files_prefix="Env.File",
            default_notify_period=_ENVIRONMENT_NOTIFY_PERIOD,
            write_path_mapping_file=self._write_path_mapping_file,
        )
        self._start(request, entered, setting_error)
        return identifier

    def _resolve_variables(self, entered: _EnteredEnvironment, symtab: SymbolTable) -> Optional[str]:
        variables = entered.model.variables
        if not variables:
            return None
        for name, value in variables.items():
            reason = invalid_variable_reason(name, str(value))
            if reason is not None:
                return f"Environment {entered.model.name} defines an invalid variable: {reason}."
            try:
                resolved = value.resolve(symtab=symtab)
            except FormatStringError as err:
                return f"Could not resolve the value of environment variable {name}: {err}"
            self._logger.info("Setting: %s=%s", name, resolved, content=LogContent.PARAMETER_INFO)
            entered.variables[name] = resolved
        return None

    def exit_environment(
        self,
        *,
        identifier: EnvironmentIdentifier,
        os_env_vars: Optional[dict[str, str]] = None,
        keep_session_running: bool = False,
    ) -> None:
        """Run the environment's ``onExit`` and drop its variables from later actions.

        Environments are exited in reverse order of entry. Unless ``keep_session_running``
        is True, the session only accepts further exits afterwards (``READY_ENDING``).

        Raises:
            RuntimeError: the session is not ``READY`` or ``READY_ENDING``, or the
                identifier is unknown or not the most recently entered environment.
        """
        if self._state not in (SessionState.READY, SessionState.READY_ENDING):
            raise RuntimeError("Session must be in the READY or READY_ENDING state to exit an Environment.")
        if identifier not in self.environments_entered:
            raise RuntimeError(f"Cannot exit unknown Environment with identifier {identifier}")
        last = self._environments[-1].identifier
        if identifier != last:
            raise RuntimeError(f"Cannot exit Environment {identifier}. Must exit Environment {last} first.")
        check_os_env_vars(os_env_vars)

        self._reset_action_status()
        if not keep_session_running:
            self._ending_only = True
        entered = self._environments[-1]
        self._logger.section_banner(f"Exiting Environment: {entered.model.name}")
        env = self._overrides(os_env_vars, use_environments=True)
        self._environments.pop()
        script = entered.model.script
        action = script.actions.onExit if script is not None else None
        request = ActionInput(
            kind="exit",
            env=env,
            action=action,
            symtab=self._symbol_table(None),
            embedded_files=(script.embeddedFiles or ()) if script is not None else (),
            files_prefix="Env.File",
            default_timeout=_EXIT_DEFAULT_TIMEOUT,
            default_notify_period=_ENVIRONMENT_NOTIFY_PERIOD,
            write_path_mapping_file=self._write_path_mapping_file,
        )
        self._start(request, entered, None)

    # ----- tasks and subprocesses ------------------------------------------------------

    def run_task(
        self,
        *,
        step_script: StepScriptModel,
        task_parameter_values: TaskParameterSet,
        os_env_vars: Optional[dict[str, str]] = None,
        log_task_banner: bool = True,
    ) -> None:
        """Run the step script's ``onRun`` action for one task.

        Raises:
            RuntimeError: the session is not ``READY``.
            ValueError: an ``os_env_vars`` entry cannot be given to a process.
        """
        self._run_task(step_script, task_parameter_values, os_env_vars, log_task_banner, True)

    def _run_task_without_session_env(
        self,
        *,
        step_script: StepScriptModel,
        task_parameter_values: TaskParameterSet,
        os_env_vars: Optional[dict[str, str]] = None,
        log_task_banner: bool = True,
    ) -> None:
        """Run a task with only the host's, the session's and this call's variables."""
        self._run_task(step_script, task_parameter_values, os_env_vars, log_task_banner, False)

    def _run_task(
        self,
        step_script: StepScriptModel,
        task_parameter_values: TaskParameterSet,
        os_env_vars: Optional[dict[str, str]],
        log_task_banner: bool,
        use_environments: bool,
    ) -> None:
        if self._state != SessionState.READY:
            raise RuntimeError("Session must be in the READY state to run a task.")
        check_os_env_vars(os_env_vars)

        if log_task_banner:
            self._logger.section_banner("Running Task")
        if task_parameter_values:
            self._logger.info("Parameter values:", content=LogContent.PARAMETER_INFO)
            for name, parameter in task_parameter_values.items():
                self._logger.info(
                    f"{name}({parameter.type.value}) = {parameter.value}",
                    content=LogContent.PARAMETER_INFO,
                )
        self._reset_action_status()
        request = ActionInput(
            kind="task",
            env=self._overrides(os_env_vars, use_environments=use_environments),
            action=step_script.actions.onRun,
            symtab=self._symbol_table(task_parameter_values),
            embedded_files=step_script.embeddedFiles or (),
            files_prefix="Task.File",
            default_notify_period=_TASK_NOTIFY_PERIOD,
            write_path_mapping_file=self._write_path_mapping_file,
        )
        self._start(request, None, None)

    def run_subprocess(
        self,
        *,
        command: str,
        args: Optional[list[str]] = None,
        timeout: Optional[int] = None,
        os_env_vars: Optional[dict[str, str]] = None,
        use_session_env_vars: bool = True,
        log_banner_message: Optional[str] = None,
    ) -> None:
        """Run ``command`` with ``args`` exactly as given, without format-string processing.

        Raises:
            RuntimeError: the session is not ``READY``.
            ValueError: ``timeout`` is not positive, ``command`` is empty, an argument
                contains a NUL character, or an ``os_env_vars`` entry is invalid.
        """
        if self._state != SessionState.READY:
            raise RuntimeError(
                f"Session must be in the READY state to run a subprocess. Current state: {self._state.value}"
            )
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be a positive integer")
        if not command or not command.strip():
            raise ValueError("command must be a non-empty string")
        argv = [command, *(args or [])]
        for position, text in enumerate(argv):
            if "\0" in text:
                where = "command" if position == 0 else f"argument {position}"
                raise ValueError(f"The {where} of run_subprocess contains a NUL character: {text!r}")
        check_os_env_vars(os_env_vars)

        if log_banner_message:
            self._logger.section_banner(log_banner_message)
        self._reset_action_status()
        request = ActionInput(
            kind="subprocess",
            env=self._overrides(os_env_vars, use_environments=use_session_env_vars),
            argv=argv,
            timeout=timeout,
        )
        self._start(request, None, None)

    # ----- running actions -------------------------------------------------------------

    def _start(
        self,
        request: ActionInput,
        environment: Optional[_EnteredEnvironment],
        prelaunch_error: Optional[str],
    ) -> None:
        runner = ActionRunner(
            logger=self._logger,
            redactor=self._redactor,
            redaction_enabled=self._redaction_enabled,
            processes=self._processes,
            working_directory=self._working_directory,
            files_directory=self._files_directory,
            user=self._user,
            on_event=self._on_runner_event,
            on_secret=self._activate_redaction,
            launcher=self._launcher,
        )
        with self._lock:
            self._runner = runner
            self._running_environment = environment
            self._state = SessionState.RUNNING
        if prelaunch_error is not None:
            runner.start_failed(prelaunch_error)
        else:
            runner.start(request)

    def _on_runner_event(self, event: RunnerEvent) -> None:
        if isinstance(event, EnvChanged):
            environment = self._running_environment
            if environment is not None:
                environment.variables[event.name] = event.value
            return
        assert isinstance(event, StatusChanged)
        self._action_status = event.status
        if event.final:
            with self._lock:
                if self._state == SessionState.RUNNING:
                    success = event.status.state == ActionState.SUCCESS
                    if success and not self._ending_only:
                        self._state = SessionState.READY
                    else:
                        self._state = SessionState.READY_ENDING
                self._running_environment = None
        self._invoke_callback(event.status)

    def _invoke_callback(self, status: ActionStatus) -> None:
        if self._callback is None:
            return
        try:
            self._callback(self._session_id, status)
        except BaseException:  # noqa: B036 - even SystemExit from a callback must not kill the action's thread
            self._logger.exception(
                "The session callback raised an exception; the action continues.",
                content=LogContent.EXCEPTION_INFO,
            )

    def _activate_redaction(self) -> None:
        if self._logger.redact is None and self._redactor.active:
            self._logger.redact = self._redactor.redact
            register_redactor(self._session_id, self._redactor.redact)

    def cancel_action(self, *, time_limit: Optional[timedelta] = None, mark_action_failed: bool = False) -> None:
        """Start canceling the running action with its cancel method; does not wait.

        ``time_limit`` caps the notify period of a ``NOTIFY_THEN_TERMINATE`` action;
        ``timedelta(0)`` terminates at once. ``mark_action_failed`` makes the final state
        ``FAILED`` instead of ``CANCELED`` or ``TIMEOUT``.

        Raises:
            RuntimeError: no action is running.
        """
        runner = self._runner
        if self._state != SessionState.RUNNING or runner is None:
            raise RuntimeError("No actions are running")
        runner.cancel(time_limit=time_limit, mark_failed=mark_action_failed)

    def _reset_action_status(self) -> None:
        self._action_status = None

    # ----- helpers ---------------------------------------------------------------------

    def _symbol_table(self, task_parameters: Optional[TaskParameterSet]) -> SymbolTable:
        symtab = build_symbol_table(
            revision=self._revision_extensions.spec_rev,
            working_directory=self._working_directory,
            job_parameters=self._job_parameter_values,
            task_parameters=task_parameters,
            rules=self._rules or (),
        )
        symtab["Session.HasPathMappingRules"] = "true" if self._rules else "false"
        return symtab

    def _write_path_mapping_file(self) -> Path:
        return write_path_mapping_file(self._working_directory, self._rules or (), self._user)

    def _overrides(self, call_vars: Optional[dict[str, str]], *, use_environments: bool) -> EnvOverrides:
        sets: Iterable[dict[str, Optional[str]]] = (
            [env.variables for env in self._environments] if use_environments else []
        )
        return build_overrides(self._session_env, call_vars, sets)

    # ----- cleanup ---------------------------------------------------------------------

    def cleanup(self) -> None:
        """End the session: stop a running action, end leftover processes, delete files.

        A running action is canceled with ``TERMINATE`` and waited for. Processes that
        actions left running in the background are killed. The working directory is
        deleted unless ``retain_working_dir`` was True. Calling it again does nothing.
        """
        if self._cleaned_up:
            return
        self._cleaned_up = True
        runner = self._runner
        if runner is not None and not runner.finished:
            runner.cancel(time_limit=timedelta(0))
            # From a callback on the action's own thread, waiting would wait for ourselves.
            if not runner.in_action_thread() and not runner.wait(_CLEANUP_CANCEL_WAIT):
                self._logger.error(
                    f"The running action did not end within {_CLEANUP_CANCEL_WAIT:.0f} seconds of "
                    "being canceled; cleanup continues without it.",
                    content=LogContent.PROCESS_CONTROL,
                )
        self._end_leftover_processes()
        if not self._retain_working_dir:
            delete_working_directory(self._logger, self._working_directory, self._launcher.sudo_user)
        unregister_redactor(self._session_id)
        self._state = SessionState.ENDED

    def _end_leftover_processes(self) -> None:
        try:
            killed = self._processes.kill_all()
        except KillPermissionError as err:
            killed = err.signalled
            self._kill_as_user(err.denied)
            killed += err.denied
        except OSError as err:
            self._logger.error(
                f"Could not end the processes that actions of this session left running: {err}",
                content=LogContent.PROCESS_CONTROL | LogContent.EXCEPTION_INFO,
            )
            killed = []
        if killed:
            self._logger.warning(
                f"Killed {len(killed)} process(es) that actions of this session left running: {sorted(killed)}",
                content=LogContent.PROCESS_CONTROL,
            )
        self._processes.close()

    def _kill_as_user(self, pids: list[int]) -> None:
        user = self._launcher.sudo_user
        if user is None:
            return
        try:
            command, _ = kill_as_user(user, pids)
        except (OSError, subprocess.SubprocessError, SudoRefusedError) as err:
            self._logger.error(
                f"Could not kill process(es) {pids} of user {user.user} that actions left running: {err}",
                content=LogContent.PROCESS_CONTROL | LogContent.EXCEPTION_INFO,
            )
            return
        self._logger.info(f"INTERRUPT: Running: {shlex.join(command)}", content=LogContent.PROCESS_CONTROL)
