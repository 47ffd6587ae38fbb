"""`transformers serve --trust-remote-code` in a process of its own, on 127.0.0.1 at a free port, for the serving
test (tests/test_serving.py) and bench/serve_throughput.py.

The server gets the environment without ``PYTHON*`` variables (so it cannot import this repository and loads the
checkpoint's bundled code) and its own ``HF_MODULES_CACHE`` under ``workdir``; its output goes to
``workdir/server.log``.
"""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_healthy(server: subprocess.Popen, url: str, log: Path, startup_seconds: float) -> None:
    """Return once ``url/health`` answers; RuntimeError with the log's tail if the server exits or stays silent."""
    deadline = time.monotonic() + startup_seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"transformers serve exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"transformers serve did not answer within {startup_seconds} s:\n{log.read_text()[-3000:]}")


@contextmanager
def transformers_server(checkpoint: Path, workdir: Path, options: list[str], startup_seconds: float,
                        env: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    """Serve ``checkpoint`` with the extra command-line ``options`` (e.g. ``--device cpu``); yields the process and
    its base URL once it is healthy, and stops it on exit."""
    port, log = free_port(), workdir / "server.log"
    server_env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    server_env |= {"HF_MODULES_CACHE": str(workdir / "hf_modules"), **(env or {})}
    command = [str(Path(sys.executable).parent / "transformers"), "serve", str(checkpoint), "--trust-remote-code",
               "--host", "127.0.0.1", "--port", str(port), *options]
    with open(log, "w") as log_file:
        process = subprocess.Popen(command, cwd=workdir, env=server_env, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(process, url, log, startup_seconds)
        yield process, url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
