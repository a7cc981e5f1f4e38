"""Session setup and teardown on disk: host information, the working directory, cleanup."""

from __future__ import annotations

import logging
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

import openjd.model

from ._files import (
    STICKY_BIT_WARNING,
    create_files_directory,
    create_working_directory,
    default_root_directory,
    prepare_default_root,
    remove_tree,
    sticky_bit_warnings,
)
from ._logging import LogContent, SessionLogger
from ._posix_user import SudoRefusedError, remove_as_user
from ._session_user import PosixSessionUser, SessionUser
from ._version import version

__all__ = ("create_session_directories", "delete_working_directory", "log_host_info")


def log_host_info(logger: SessionLogger, session_id: str) -> None:
    """Log the library versions, interpreter and platform, then the session's start."""
    info = logger.info
    info(f"openjd.model Library Version: {openjd.model.version}", content=LogContent.HOST_INFO)
    info(f"openjd.sessions Library Version: {version}", content=LogContent.HOST_INFO)
    info("Installed at: %s", str(Path(__file__).resolve().parent.parent), content=LogContent.HOST_INFO)
    info(f"Python Interpreter: {sys.executable}", content=LogContent.HOST_INFO)
    info("Python Version: %s", sys.version.replace("\n", " - "), content=LogContent.HOST_INFO)
    info(f"Platform: {sys.platform}", content=LogContent.HOST_INFO)
    info(f"Initializing Open Job Description Session: {session_id}")


def create_session_directories(
    logger: SessionLogger, root: Optional[Path], session_id: str, user: Optional[SessionUser]
) -> tuple[Path, Path]:
    """Create and log the working directory and its embedded-files directory.

    Raises:
        RuntimeError: a directory could not be created; the error is logged first.
    """
    if root is None:
        root = default_root_directory()
        prepare_default_root(root)
    for ancestor in sticky_bit_warnings(root):
        logger.warning(STICKY_BIT_WARNING.format(ancestor), content=LogContent.HOST_INFO | LogContent.FILE_PATH)
    try:
        working_directory = create_working_directory(root, session_id, user)
        files_directory = create_files_directory(working_directory, user)
    except RuntimeError as err:
        logger.error(
            f"ERROR creating Session Working Directory: {err}",
            content=LogContent.COMMAND_OUTPUT | LogContent.FILE_PATH,
        )
        raise
    logger.info(f"Session Working Directory: {working_directory}", content=LogContent.FILE_PATH)
    logger.info(f"Session's Embedded Files Directory: {files_directory}", content=LogContent.FILE_PATH)
    return working_directory, files_directory


def delete_working_directory(logger: SessionLogger, path: Path, sudo_user: Optional[PosixSessionUser]) -> None:
    """Delete the working directory; log what could not be deleted instead of raising.

    With a ``sudo_user``, the entries are first deleted as that user, because files its
    actions created can be private to it.
    """
    logger.section_banner("Session Cleanup")
    logger.info(f"Deleting working directory: {path}", content=LogContent.FILE_PATH)
    if sudo_user is not None:
        _delete_as_user(logger, path, sudo_user)
    failures = remove_tree(path)
    if not failures:
        return
    try:
        raise RuntimeError(f"Files within temporary directory {path} could not be deleted.\n" + "\n".join(failures))
    except RuntimeError as err:
        logger.log(logging.ERROR, str(err), content=LogContent.EXCEPTION_INFO | LogContent.FILE_PATH, exc_info=True)


def _delete_as_user(logger: SessionLogger, path: Path, user: PosixSessionUser) -> None:
    try:
        entries = sorted(entry for entry in path.iterdir() if not entry.name.startswith("."))
    except OSError as err:
        logger.warning(f"Could not list {path} for deletion: {err}", content=LogContent.FILE_PATH)
        return
    if not entries:
        return
    try:
        command, code, output = remove_as_user(user, entries)
    except (OSError, subprocess.SubprocessError, SudoRefusedError) as err:
        logger.warning(
            f"Could not delete the working directory's files as user {user.user}: {err}",
            content=LogContent.EXCEPTION_INFO | LogContent.FILE_PATH,
        )
        return
    logger.info("Running command %s", shlex.join(command), content=LogContent.FILE_PATH | LogContent.PROCESS_CONTROL)
    for line in output.splitlines():
        logger.output(line)
    if code != 0:
        logger.warning(
            f"Deleting files as user {user.user} exited with code {code}.", content=LogContent.PROCESS_CONTROL
        )
