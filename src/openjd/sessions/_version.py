"""Version of the openjd-sessions distribution."""

from __future__ import annotations

from typing import Optional

__all__ = (
    "__commit_id__",
    "__version__",
    "__version_tuple__",
    "commit_id",
    "version",
    "version_tuple",
)

version = __version__ = "0.10.8"
version_tuple = __version_tuple__ = (0, 10, 8)
commit_id: Optional[str] = None
__commit_id__: Optional[str] = None
