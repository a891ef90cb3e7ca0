"""An HTTP server run as a child process for a benchmark (``llama-server``, ``fastinfer serve``):
started on a free local port, ready once ``GET /health`` answers 200, its output kept in a
temporary file (a pipe nobody reads would fill and stall a chatty server), stopped on close."""
from __future__ import annotations

import http.client
import os
import socket
import subprocess
import tempfile
import time


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``ServerProcess(name, cmd, port)`` then ``start()``; ``close()`` stops it (idempotent)."""

    def __init__(self, name: str, cmd: list[str], port: int, env: dict[str, str] | None = None) -> None:
        self.name, self.cmd, self.port, self.env = name, cmd, port, env
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile(mode="w+b")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_timeout_s: float = 120.0) -> ServerProcess:
        """Starts the process and waits until ``/health`` answers 200; raises RuntimeError (with
        the end of the server's output) when it exits or is not ready in ``ready_timeout_s``."""
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.close()
                raise RuntimeError(f"{self.name} exited ({code}) before it was ready: {self.log_tail()}")
            if self._healthy():
                return self
            time.sleep(0.25)
        self.close()
        raise RuntimeError(f"{self.name} was not ready in {ready_timeout_s:g} s: {self.log_tail()}")

    def _healthy(self) -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        except OSError:
            return False

    def log_tail(self, chars: int = 800) -> str:
        """The last ``chars`` characters the process printed."""
        self._log.flush()
        size = self._log.seek(0, os.SEEK_END)
        self._log.seek(max(0, size - chars))
        return self._log.read().decode(errors="replace")

    def peak_rss_mb(self) -> float | None:
        """The process's peak resident memory so far (``VmHWM``), in MB; None when unknown."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except (OSError, ValueError, AttributeError):
            pass
        return None

    def close(self) -> None:
        """Stops the process: SIGTERM, then SIGKILL after 10 s."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
