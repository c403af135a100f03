"""Helpers for the server tests: start `s2t-edge serve` on a free loopback port, talk raw HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MAIN = "import sys; from s2t_edge.cli import main; sys.argv[0] = 's2t-edge'; main()"


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path  # the server's stderr

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then the exit code (killed and failed if it does not stop in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the server did not stop within {timeout} s of SIGTERM") from None


def cli_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO)}


@contextlib.contextmanager
def serving(model: Path, *args: str, timeout: float = 180.0) -> Iterator[Server]:
    """`s2t-edge serve --model MODEL --port 0 ARGS`, up once it prints its URL; stopped after."""
    log = Path(tempfile.mkstemp(prefix="s2t-serve-", suffix=".log")[1])
    cmd = [sys.executable, "-c", MAIN, "serve", "--model", str(model), "--port", "0", *args]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO, env=cli_env())
    server = Server("", proc, log)
    try:
        deadline = time.monotonic() + timeout
        line = ""
        while "http://" not in line:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the server did not start:\n{server.stderr()}")
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                line = proc.stdout.readline()
        server.url = re.search(r"http://\S+", line).group(0)
        yield server
    finally:
        server.stop()
        log.unlink(missing_ok=True)


def http(
    url: str, path: str, body: Any = None, *, method: str | None = None, key: str | None = None, timeout: float = 120
) -> tuple[int, Any]:
    """One request; returns (status, parsed JSON or text). `body` bytes are sent as they are."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    text = raw.decode("utf-8", "replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def sse_events(lines: Iterator[bytes]) -> Iterator[Any]:
    """The `data:` payloads of a server-sent event stream (JSON, or the string "[DONE]")."""
    for raw in lines:
        line = raw.decode().strip()
        if line.startswith("data:"):
            payload = line[5:].strip()
            yield payload if payload == "[DONE]" else json.loads(payload)
