"""The app on a free loopback port, for browser tests and benchmarks: ``saescope serve`` in a
subprocess, or an app object in uvicorn on a thread of this process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx
import uvicorn
from fastapi import FastAPI


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_processes(port: int) -> list[int]:
    """The server started with ``--port PORT`` (``saescope serve`` or uvicorn) and every process
    below it (workers, the live model process), from Linux's /proc; the server first."""
    parents, commands = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except OSError:  # it ended while we looked
            continue
        parents[int(stat.parent.name)], commands[int(stat.parent.name)] = parent, command
    flag = [b"--port", str(port).encode()]
    tree = [
        pid
        for pid, command in commands.items()
        if any(command[i : i + 2] == flag for i in range(len(command) - 1))
    ]
    for pid in tree:  # grows as it is walked: children, then grandchildren
        tree.extend(child for child, parent in parents.items() if parent == pid)
    return tree


@contextmanager
def serving(
    db_url: str, *flags: str, timeout: float = 60.0, env: dict[str, str] | None = None
) -> Iterator[str]:
    """Run ``saescope serve --db db_url --no-live *flags`` (with ``env`` added to the
    environment); yield its base URL once it answers. Leaving the block sends it SIGTERM."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "sae_core",
        "serve",
        "--db",
        db_url,
        "--port",
        str(port),
        "--no-live",
        "--log-level",
        "warning",
        *flags,
    ]
    with running(command, port, env=env, timeout=timeout) as base:
        yield base


@contextmanager
def running(
    command: list[str], port: int, *, env: dict[str, str] | None = None, timeout: float = 60.0
) -> Iterator[str]:
    """Run a server ``command`` listening on ``port``; yield its base URL once it answers.
    Its output goes to a temporary file (a pipe nobody reads would fill and block it), shown
    if it exits before answering."""
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until_answering(process, base, timeout, log)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _wait_until_answering(
    process: subprocess.Popen, base: str, timeout: float, log: IO[bytes]
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"the server exited {process.returncode}: {log.read().decode()}")
        try:
            if httpx.get(f"{base}/api/v1/saes", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"saescope serve did not answer within {timeout:.0f} s")


@contextmanager
def serving_app(app: FastAPI, timeout: float = 30.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a thread of this process; yield its base URL once started."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the app server did not start within {timeout:.0f} s")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
