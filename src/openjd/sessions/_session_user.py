"""OS users that a session can run its actions as.

``PosixSessionUser`` works only on POSIX hosts and ``WindowsSessionUser`` only on Windows,
but both import on every OS so that callers can refer to them unconditionally.
"""

from __future__ import annotations

import os
import sys
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from ctypes.wintypes import HANDLE

__all__ = (
    "BadCredentialsException",
    "PosixSessionUser",
    "SessionUser",
    "WindowsSessionUser",
)


class BadCredentialsException(Exception):  # noqa: N818 (public name of the API)
    """The Windows user name or password was rejected by the logon check."""


class SessionUser(ABC):
    """An OS user that runs a session's actions.

    When ``is_process_user()`` is true, actions run without impersonation but the session
    still grants the user access to its working directory.
    """

    user: str
    """User name as the OS accepts it."""

    @staticmethod
    @abstractmethod
    def _get_process_user() -> str:
        """Return the name of the user that runs this process, in the form ``user`` uses."""

    def is_process_user(self) -> bool:
        """Return whether ``user`` is exactly the name of the user running this process."""
        return self.user == self._get_process_user()


class PosixSessionUser(SessionUser):
    """A POSIX user that actions run as through passwordless ``sudo -u``.

    ``group`` is a group that both this process's user and ``user`` belong to. The session
    gives it access to every file it writes.
    """

    __slots__ = ("user", "group")

    user: str
    group: str

    def __init__(self, user: str, *, group: Optional[str] = None) -> None:
        """Describe ``user``. An empty or missing ``group`` means this process's effective group.

        Raises:
            RuntimeError: this host is not POSIX.
        """
        if sys.platform == "win32":
            raise RuntimeError("Only available on posix systems.")

        import grp

        self.user = user
        self.group = group or grp.getgrgid(os.getegid()).gr_name

    @staticmethod
    def _get_process_user() -> str:
        if sys.platform == "win32":
            raise RuntimeError("Only available on posix systems.")

        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name


class WindowsSessionUser(SessionUser):
    """A Windows user that actions run as, given by a password or by a logon token.

    ``user`` is ``name``, ``DOMAIN\\name`` or ``name@domain``. A password works only from an
    interactive desktop session. A service running in session 0 must pass a ``logon_token``
    that it created with the ``LogonUser`` family of functions.
    """

    __slots__ = ("user", "password", "logon_token")

    user: str
    password: Optional[str]
    logon_token: Optional[HANDLE]

    def __init__(
        self,
        user: str,
        *,
        password: Optional[str] = None,
        logon_token: Optional[HANDLE] = None,
    ) -> None:
        """Describe ``user`` and check the credentials.

        A password is checked with an interactive logon, so a wrong one fails here rather
        than when the first action starts. For the user running this process, give neither
        credential: the session then runs actions without impersonation.

        Raises:
            RuntimeError: this host is not Windows, or the credentials do not fit ``user``.
                The message names the credential to give or to leave out.
            ValueError: both ``password`` and ``logon_token`` were given.
            BadCredentialsException: Windows rejected the user name or password.
        """
        if sys.platform != "win32":
            raise RuntimeError("Only available on Windows systems.")

        if password and logon_token:
            raise ValueError('The "password" and "logon_token" arguments are mutually exclusive')
        self.user = user
        self.password = None
        self.logon_token = None

        if self.is_process_user():
            if password is not None:
                raise RuntimeError("User is the process owner. Do not provide a password.")
            if logon_token is not None:
                raise RuntimeError("User is the process owner. Do not provide a logon token.")
            return

        if password is None and logon_token is None:
            raise RuntimeError(
                "Must supply a password or logon token. User is not the process owner."
            )
        if password is not None:
            _check_password(user, password)
            self.password = password
        else:
            self.logon_token = logon_token

    @staticmethod
    def _get_process_user() -> str:
        if sys.platform == "win32":
            import win32api
            import win32con

            # NameSamCompatible gives DOMAIN\name, so a bare user name never matches.
            return str(win32api.GetUserNameEx(win32con.NameSamCompatible))
        raise RuntimeError("Only available on Windows systems.")


def _check_password(user: str, password: str) -> None:
    """Log ``user`` on interactively with ``password`` and close the token at once.

    Raises:
        RuntimeError: this host is not Windows, or this process runs in session 0, where
            password logons are not supported.
        BadCredentialsException: Windows rejected the user name or password.
    """
    if sys.platform != "win32":
        raise RuntimeError("Only available on Windows systems.")
    else:
        # pywin32 is a dependency only on Windows, so its modules are imported here and
        # mypy skips this branch on other platforms.
        # NOTE: this branch has not run on a Windows host, and mypy has not checked it
        # because no pywin32 stubs are installed.
        import pywintypes
        import win32con
        import win32security
        import win32ts
        import winerror

        if win32ts.ProcessIdToSessionId(os.getpid()) == 0:
            raise RuntimeError(
                "Must supply a logon_token rather than a password. "
                "Passwords are not supported when running in Windows Session 0."
            )

        domain: Optional[str] = None
        name = user
        if "\\" in user:
            domain, name = user.split("\\", 1)
        try:
            token = win32security.LogonUser(
                name,
                domain,
                password,
                win32con.LOGON32_LOGON_INTERACTIVE,
                win32con.LOGON32_PROVIDER_DEFAULT,
            )
        except pywintypes.error as error:
            if error.winerror == winerror.ERROR_LOGON_FAILURE:
                raise BadCredentialsException("The username or password is incorrect.") from error
            raise
        token.Close()
