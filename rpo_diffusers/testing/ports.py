"""A free TCP port on the loopback interface, for tests that start servers or process groups."""

from __future__ import annotations

import socket


def free_local_port() -> int:
    """A port nothing listens on right now (the OS picks it; it is released before returning)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
