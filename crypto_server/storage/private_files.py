"""Files and directories only this service's user may read: the data directory, the key store, a generated root key.

Modes are set explicitly rather than left to the umask: a 022 umask would leave wrapped keys and a development
root key readable by every user on the host. A file or directory that exists already with group or other
access loses that access, with a warning, because the service owns everything in its data directory.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

PRIVATE_DIRECTORY_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
_GROUP_AND_OTHER = 0o077


def ensure_private_directory(path: Path) -> None:
    """Create `path` (and missing parents) with mode 0700, or take group and other access away from it.

    Raises OSError when the directory cannot be created.
    """
    try:
        path.mkdir(mode=PRIVATE_DIRECTORY_MODE, parents=True)
    except FileExistsError:
        restrict_to_owner(path)
    else:
        os.chmod(path, PRIVATE_DIRECTORY_MODE)  # the umask may have taken owner bits too


def ensure_private_file(path: Path) -> None:
    """Create `path` empty with mode 0600 unless it exists; take group and other access away from it if it does.

    Raises OSError when the file cannot be created.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    except FileExistsError:
        restrict_to_owner(path)
        return
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)
    finally:
        os.close(fd)


def restrict_to_owner(path: Path) -> None:
    """Remove group and other permissions from an existing file or directory, with a warning when it had any.

    One that cannot be changed (owned by another user) is left as it is, with a warning.
    """
    mode = stat.S_IMODE(path.stat().st_mode)
    if not mode & _GROUP_AND_OTHER:
        return
    private = mode & ~_GROUP_AND_OTHER
    try:
        os.chmod(path, private)
    except OSError as error:
        log.warning(
            "cannot take group and other access away from a file of the data directory",
            extra={"path": str(path), "mode": oct(mode), "error": error.strerror},
        )
        return
    log.warning(
        "took group and other access away from a file of the data directory",
        extra={"path": str(path), "mode_before": oct(mode), "mode": oct(private)},
    )
