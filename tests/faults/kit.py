"""Helpers of the fault tests: a pipeline of counting nodes, a redis-server of one's own."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from stroma import NodeContract, stroma_node


class Acc(BaseModel):
    value: int


def pipeline(
    n: int, calls: list[str] | None = None, during: Callable[[int], Awaitable[Any]] | None = None
) -> list[Any]:
    """``n`` nodes adding 1 to ``value``; node i awaits ``during(i)`` first if given, and
    appends its id to ``calls``."""
    nodes = []
    for i in range(n):
        node_id = f"n{i:02d}"
        contract = NodeContract(node_id=node_id, input_schema=Acc, output_schema=Acc)

        def make(i: int, node_id: str) -> Any:
            async def step(state: Acc) -> dict[str, int]:
                if calls is not None:
                    calls.append(node_id)
                if during is not None:
                    await during(i)
                return {"value": state.value + 1}

            return step

        nodes.append(stroma_node(node_id, contract)(make(i, node_id)))
    return nodes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class OwnRedis:
    """A redis-server of the test's own: start, stop, restart (data kept), pause, resume."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.folder),
             "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server (SIGTERM: it fsyncs its append-only file and exits)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a paused server cannot exit
            self.process.terminate()
            self.process.wait(timeout=20)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)
