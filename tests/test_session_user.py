from __future__ import annotations

import os
import sys
from typing import Any

import pytest

from openjd.sessions._session_user import (
    BadCredentialsException,
    PosixSessionUser,
    SessionUser,
    WindowsSessionUser,
)

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX host behaviour")
windows_only = pytest.mark.skipif(sys.platform != "win32", reason="Windows host behaviour")


def process_user_name() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def effective_group_name() -> str:
    import grp

    return grp.getgrgid(os.getegid()).gr_name


# --- SessionUser and BadCredentialsException --------------------------------------------


def test_session_user_is_abstract() -> None:
    with pytest.raises(TypeError):
        SessionUser()  # type: ignore[abstract]


def test_session_user_compares_names() -> None:
    class FixedUser(SessionUser):
        def __init__(self, user: str) -> None:
            self.user = user

        @staticmethod
        def _get_process_user() -> str:
            return "DOMAIN\\agent"

    assert FixedUser("DOMAIN\\agent").is_process_user() is True
    assert FixedUser("agent").is_process_user() is False
    assert FixedUser("domain\\agent").is_process_user() is False


def test_bad_credentials_is_exception() -> None:
    assert issubclass(BadCredentialsException, Exception)
    assert str(BadCredentialsException("wrong")) == "wrong"


def test_user_classes_declare_slots() -> None:
    assert PosixSessionUser.__slots__ == ("user", "group")
    assert WindowsSessionUser.__slots__ == ("user", "password", "logon_token")
    assert issubclass(PosixSessionUser, SessionUser)
    assert issubclass(WindowsSessionUser, SessionUser)


# --- PosixSessionUser -------------------------------------------------------------------


@posix_only
@pytest.mark.parametrize(
    ("group", "expected_group"),
    [
        (None, None),
        ("", None),
        ("some-group", "some-group"),
    ],
)
def test_posix_user_group_default(group: str | None, expected_group: str | None) -> None:
    user = PosixSessionUser("someone", group=group)

    assert user.user == "someone"
    assert user.group == (expected_group or effective_group_name())


@posix_only
def test_posix_user_is_process_user() -> None:
    assert PosixSessionUser(process_user_name()).is_process_user() is True
    assert PosixSessionUser(process_user_name() + "-other").is_process_user() is False
    assert PosixSessionUser._get_process_user() == process_user_name()


@posix_only
def test_posix_user_group_keyword_only() -> None:
    with pytest.raises(TypeError):
        PosixSessionUser("someone", "group")  # type: ignore[call-arg]


@windows_only
def test_posix_user_rejected_on_windows() -> None:
    with pytest.raises(RuntimeError) as excinfo:
        PosixSessionUser("someone")

    assert str(excinfo.value) == "Only available on posix systems."


# --- WindowsSessionUser -----------------------------------------------------------------


@posix_only
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"password": "secret"},
        {"logon_token": object()},
        {"password": "secret", "logon_token": object()},
    ],
)
def test_windows_user_rejected_off_windows(kwargs: dict[str, Any]) -> None:
    with pytest.raises(RuntimeError) as excinfo:
        WindowsSessionUser("someone", **kwargs)

    assert str(excinfo.value) == "Only available on Windows systems."


@posix_only
def test_windows_process_user_off_windows() -> None:
    with pytest.raises(RuntimeError) as excinfo:
        WindowsSessionUser._get_process_user()

    assert str(excinfo.value) == "Only available on Windows systems."


# The cases below run only on a Windows host.


@windows_only
def test_windows_user_mutually_exclusive_credentials() -> None:
    import ctypes.wintypes

    with pytest.raises(ValueError) as excinfo:
        WindowsSessionUser("someone", password="secret", logon_token=ctypes.wintypes.HANDLE(1))

    assert str(excinfo.value) == (
        'The "password" and "logon_token" arguments are mutually exclusive'
    )


@windows_only
def test_windows_process_user_needs_no_credentials() -> None:
    name = WindowsSessionUser._get_process_user()

    user = WindowsSessionUser(name)

    assert user.user == name
    assert user.is_process_user() is True
    assert user.password is None
    assert user.logon_token is None


@windows_only
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"password": ""}, "User is the process owner. Do not provide a password."),
        ({"logon_token": 0}, "User is the process owner. Do not provide a logon token."),
    ],
)
def test_windows_process_user_rejects_credentials(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(RuntimeError) as excinfo:
        WindowsSessionUser(WindowsSessionUser._get_process_user(), **kwargs)

    assert str(excinfo.value) == message


@windows_only
def test_windows_other_user_needs_credentials() -> None:
    with pytest.raises(RuntimeError) as excinfo:
        WindowsSessionUser("openjd-no-such-user")

    assert str(excinfo.value) == (
        "Must supply a password or logon token. User is not the process owner."
    )
