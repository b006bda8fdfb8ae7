"""The compose root key secret on a Linux host: create it private, and name the user that can read it.

    python3 deploy/compose/root_key_secret.py create secrets/crypto_root_key
    python3 deploy/compose/root_key_secret.py user secrets/crypto_root_key     # prints UID:GID

Outside swarm mode, docker compose bind-mounts a file secret as it is: the `uid`, `gid` and `mode` of a
service's long-form `secrets:` entry are ignored, so the container sees the host file's owner and mode. The
server reads it only if it is private to its owner (crypto_server/root_key.py), so the container must run as
the file's owner:

- created by a normal user, the file is that user's (0600) and the container runs as that user
  (`user: ${CRYPTO_USER}` in docker-compose.yml, filled in by `make up`);
- created by root, the file is given to the image's user, uid 10001 (0600), and the container runs as 10001.

A file owned by root is refused: the container would have to run as root to read it.
Standard library only: it runs before `make install`.
"""

from __future__ import annotations

import base64
import os
import sys
from pathlib import Path

IMAGE_UID = IMAGE_GID = 10001


def create(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as secret:
        os.fchmod(descriptor, 0o600)  # whatever the umask
        secret.write(base64.b64encode(os.urandom(32)).decode() + "\n")
    if os.geteuid() == 0:
        os.chown(path, IMAGE_UID, IMAGE_GID)


def user(path: Path) -> str:
    status = path.stat()
    if status.st_uid == 0:
        raise SystemExit(f"{path} is owned by root: chown {IMAGE_UID}:{IMAGE_GID} {path} (the image's user)")
    if status.st_mode & 0o077:
        raise SystemExit(f"{path} is open to other users: chmod 600 {path}")
    return f"{status.st_uid}:{status.st_gid}"


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in {"create", "user"}:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    if argv[1] == "create":
        create(Path(argv[2]))
    else:
        print(user(Path(argv[2])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
