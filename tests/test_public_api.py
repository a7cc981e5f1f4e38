from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from openjd.model import RevisionExtensions, SpecificationRevision

from openjd.sessions import _logging, _path_mapping, _types, _version

EMPTY = inspect.Parameter.empty
POSITIONAL = inspect.Parameter.POSITIONAL_OR_KEYWORD
KEYWORD = inspect.Parameter.KEYWORD_ONLY
SRC_DIR = Path(__file__).resolve().parent.parent / "src"

EXPECTED_ALL = (
    "ActionState",
    "ActionStatus",
    "EnvironmentIdentifier",
    "EnvironmentModel",
    "EnvironmentScriptModel",
    "LOG",
    "LogContent",
    "PathFormat",
    "PathMappingRule",
    "PosixSessionUser",
    "Session",
    "SessionCallbackType",
    "SessionState",
    "SessionUser",
    "StepScriptModel",
    "WindowsSessionUser",
    "BadCredentialsException",
    "version",
)


@pytest.fixture
def package() -> ModuleType:
    return importlib.import_module("openjd.sessions")


# --- package attributes -----------------------------------------------------------------


def test_package_all_exact_tuple(package: ModuleType) -> None:
    assert package.__all__ == EXPECTED_ALL
    for name in EXPECTED_ALL:
        assert hasattr(package, name), name


def test_package_has_no_dunder_version(package: ModuleType) -> None:
    assert not hasattr(package, "__version__")
    assert package.version == "0.10.8"


def test_version_module_attributes() -> None:
    assert _version.version == "0.10.8"
    assert _version.__version__ == "0.10.8"
    assert _version.version_tuple == (0, 10, 8)
    assert _version.__version_tuple__ == (0, 10, 8)
    assert _version.commit_id is None
    assert _version.__commit_id__ is None


def test_package_ships_type_marker() -> None:
    assert (SRC_DIR / "openjd" / "sessions" / "py.typed").is_file()
    assert not (SRC_DIR / "openjd" / "__init__.py").exists()


def test_log_level_info_at_import() -> None:
    # A fresh interpreter, because other tests may change the shared logger's level.
    code = (
        "import logging, openjd.sessions as s\n"
        "print(s.LOG.name, s.LOG.level == logging.INFO, s.LOG.handlers, s.LOG.propagate)\n"
        "print(s.LOG is logging.getLogger('openjd.sessions'))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC_DIR)}

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["openjd.sessions True [] True", "True"]


# --- enumerations -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("enum_class", "members"),
    [
        (
            _types.ActionState,
            [
                ("RUNNING", "running"),
                ("CANCELED", "canceled"),
                ("TIMEOUT", "timeout"),
                ("FAILED", "failed"),
                ("SUCCESS", "success"),
            ],
        ),
        (
            _types.SessionState,
            [
                ("READY", "ready"),
                ("RUNNING", "running"),
                ("CANCELING", "canceling"),
                ("READY_ENDING", "ready_ending"),
                ("ENDED", "ended"),
            ],
        ),
        (_path_mapping.PathFormat, [("POSIX", "POSIX"), ("WINDOWS", "WINDOWS")]),
    ],
)
def test_str_enum_members_in_order(enum_class: Any, members: list[tuple[str, str]]) -> None:
    assert [(member.name, member.value) for member in enum_class] == members
    assert issubclass(enum_class, str)
    for name, value in members:
        assert enum_class[name] == value


def test_log_content_flag_values() -> None:
    expected = [
        ("BANNER", 1),
        ("FILE_PATH", 2),
        ("FILE_CONTENTS", 4),
        ("COMMAND_OUTPUT", 8),
        ("EXCEPTION_INFO", 16),
        ("PROCESS_CONTROL", 32),
        ("PARAMETER_INFO", 64),
        ("HOST_INFO", 128),
    ]

    assert [(member.name, member.value) for member in _logging.LogContent] == expected
    combined = _logging.LogContent.FILE_PATH | _logging.LogContent.PROCESS_CONTROL
    assert combined.value == 34


# --- ActionStatus -----------------------------------------------------------------------


def test_action_status_fields_and_defaults() -> None:
    fields = dataclasses.fields(_types.ActionStatus)

    assert [(field.name, field.default) for field in fields] == [
        ("state", dataclasses.MISSING),
        ("progress", None),
        ("status_message", None),
        ("fail_message", None),
        ("exit_code", None),
    ]


def test_action_status_frozen_and_hashable() -> None:
    status = _types.ActionStatus(state=_types.ActionState.RUNNING)

    with pytest.raises(dataclasses.FrozenInstanceError):
        status.exit_code = 1  # type: ignore[misc]
    assert status == _types.ActionStatus(_types.ActionState.RUNNING)
    assert hash(status) == hash(_types.ActionStatus(state=_types.ActionState.RUNNING))
    assert "state=<ActionState.RUNNING: 'running'>" in repr(status)


# --- Session signatures -----------------------------------------------------------------

# (parameter name, kind, default) after ``self``; EMPTY means "no default".
SESSION_SIGNATURES: dict[str, list[tuple[str, Any, Any]]] = {
    "cleanup": [],
    "cancel_action": [
        ("time_limit", KEYWORD, None),
        ("mark_action_failed", KEYWORD, False),
    ],
    "enter_environment": [
        ("environment", KEYWORD, EMPTY),
        ("identifier", KEYWORD, None),
        ("os_env_vars", KEYWORD, None),
    ],
    "exit_environment": [
        ("identifier", KEYWORD, EMPTY),
        ("os_env_vars", KEYWORD, None),
        ("keep_session_running", KEYWORD, False),
    ],
    "run_task": [
        ("step_script", KEYWORD, EMPTY),
        ("task_parameter_values", KEYWORD, EMPTY),
        ("os_env_vars", KEYWORD, None),
        ("log_task_banner", KEYWORD, True),
    ],
    "_run_task_without_session_env": [
        ("step_script", KEYWORD, EMPTY),
        ("task_parameter_values", KEYWORD, EMPTY),
        ("os_env_vars", KEYWORD, None),
        ("log_task_banner", KEYWORD, True),
    ],
    "run_subprocess": [
        ("command", KEYWORD, EMPTY),
        ("args", KEYWORD, None),
        ("timeout", KEYWORD, None),
        ("os_env_vars", KEYWORD, None),
        ("use_session_env_vars", KEYWORD, True),
        ("log_banner_message", KEYWORD, None),
    ],
    "get_enabled_extensions": [],
    "__enter__": [],
    "__exit__": [
        ("exc_type", POSITIONAL, EMPTY),
        ("exc_value", POSITIONAL, EMPTY),
        ("traceback", POSITIONAL, EMPTY),
    ],
}


def parameters_after_self(function: Any) -> list[inspect.Parameter]:
    parameters = list(inspect.signature(function).parameters.values())
    assert parameters[0].name == "self"
    return parameters[1:]


@pytest.mark.parametrize("method_name", sorted(SESSION_SIGNATURES))
def test_session_method_signature(package: ModuleType, method_name: str) -> None:
    method = getattr(package.Session, method_name)

    parameters = parameters_after_self(method)

    actual = [(p.name, p.kind, p.default) for p in parameters]
    assert actual == SESSION_SIGNATURES[method_name]


def test_session_init_signature(package: ModuleType) -> None:
    parameters = parameters_after_self(package.Session.__init__)

    simple = [(p.name, p.kind, p.default) for p in parameters[:-1]]
    assert simple == [
        ("session_id", KEYWORD, EMPTY),
        ("job_parameter_values", KEYWORD, EMPTY),
        ("path_mapping_rules", KEYWORD, None),
        ("retain_working_dir", KEYWORD, False),
        ("user", KEYWORD, None),
        ("callback", KEYWORD, None),
        ("os_env_vars", KEYWORD, None),
        ("session_root_directory", KEYWORD, None),
    ]

    extensions = parameters[-1]
    assert (extensions.name, extensions.kind) == ("revision_extensions", KEYWORD)
    assert isinstance(extensions.default, RevisionExtensions)
    assert extensions.default.spec_rev == SpecificationRevision.v2023_09
    assert extensions.default.extensions == set()


@pytest.mark.parametrize(
    "property_name",
    ["working_directory", "files_directory", "state", "action_status", "environments_entered"],
)
def test_session_read_only_property(package: ModuleType, property_name: str) -> None:
    attribute = inspect.getattr_static(package.Session, property_name)

    assert isinstance(attribute, property)
    assert attribute.fset is None
