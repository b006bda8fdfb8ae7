"""Write a file so that it appears whole or not at all."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_file(destination: Path) -> Iterator[BinaryIO]:
    """A temporary file beside `destination`, renamed into place only if the block succeeds; on any error it
    is removed and `destination` is untouched."""
    handle, temporary = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.")
    try:
        with os.fdopen(handle, "wb") as writer:
            yield writer
        os.replace(temporary, destination)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_atomically(destination: Path, write: Callable[[BinaryIO], int]) -> int:
    """Run `write` into a temporary file beside `destination` and rename it into place only if it
    succeeds; on any error the temporary file is removed and `destination` is untouched."""
    with atomic_file(destination) as writer:
        return write(writer)
