"""The torchrun prefix every multi-process test uses."""
from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port the OS reports free right now (a fixed or pid-derived port can still be held,
    e.g. in TIME_WAIT, by the previous torchrun of the same test session)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int = 2) -> list[str]:
    """`torchrun --nproc_per_node N --master_port <free port>`, to be followed by the script and its flags."""
    return ["torchrun", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
