"""Print the image's runtime requirements: both distributions' [project] dependencies, less each other.

`make lock` feeds this to `uv pip compile`: the server depends on the client by name, which no registry has,
so the local distributions are left out and their own dependencies are resolved instead.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PROJECTS = (ROOT / "pyproject.toml", ROOT / "client" / "pyproject.toml")


def runtime_requirements() -> list[str]:
    """Every runtime dependency of the server and the client, without the two local distributions."""
    projects = [tomllib.loads(path.read_text())["project"] for path in PROJECTS]
    local = {canonicalize_name(project["name"]) for project in projects}
    return [
        line
        for project in projects
        for line in project["dependencies"]
        if canonicalize_name(Requirement(line).name) not in local
    ]


if __name__ == "__main__":
    print("\n".join(runtime_requirements()))
