"""Nonces: never repeated within a process, across threads, or between a parent and a forked child."""

from __future__ import annotations

import os
import threading

from crypto_server.domain.nonces import NONCE_BYTES, random_nonce


def test_nonces_are_12_bytes_and_never_repeat_across_threads() -> None:
    seen: list[bytes] = []
    lock = threading.Lock()

    def draw() -> None:
        mine = [random_nonce() for _ in range(5000)]
        with lock:
            seen.extend(mine)

    threads = [threading.Thread(target=draw) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {len(nonce) for nonce in seen} == {NONCE_BYTES}
    assert len(set(seen)) == len(seen) == 40_000


def test_a_forked_child_does_not_reuse_the_parents_buffered_bytes() -> None:
    random_nonce()  # the parent now holds a partly used block
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        os.write(write_end, b"".join(random_nonce() for _ in range(50)))
        os._exit(0)
    os.close(write_end)
    child = b""
    while chunk := os.read(read_end, 4096):
        child += chunk
    os.close(read_end)
    os.waitpid(pid, 0)
    parent = [random_nonce() for _ in range(50)]
    child_nonces = [child[i : i + NONCE_BYTES] for i in range(0, len(child), NONCE_BYTES)]
    assert len(child_nonces) == 50
    assert not set(child_nonces) & set(parent)
