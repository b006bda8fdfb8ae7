"""CPU time of a server under test and its worker processes, read from /proc (Linux): the benchmarks report CPU per
call or per MiB beside rates, because it moves less than rates when other work shares the machine."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def cpu_seconds_of_tree(root_pid: int) -> float:
    """CPU time (user + system) of `root_pid` and every live descendant, from /proc (Linux)."""
    return sum(_cpu_seconds(pid) for pid in process_tree(root_pid))


def process_tree(root_pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent = int(_stat_fields(int(entry.name))[1])
                children.setdefault(parent, []).append(int(entry.name))
    tree = [root_pid]
    for pid in tree:  # grows while iterating: a breadth-first walk
        tree.extend(children.get(pid, ()))
    return tree


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name (which may hold spaces): fields 3 onwards, so index 0 is `state`."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def _cpu_seconds(pid: int) -> float:
    try:
        fields = _stat_fields(pid)
    except (OSError, ValueError):
        return 0.0  # exited meanwhile
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")
