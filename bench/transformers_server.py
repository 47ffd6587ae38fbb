"""`transformers serve --trust-remote-code` in a process of its own, on 127.0.0.1 at a free port, for the serving
test (tests/test_serving.py) and bench/serve_throughput.py.

The server runs this interpreter's ``transformers`` (``python -m transformers.cli.transformers``, so packages carried
on ``PYTHONPATH`` are the ones it uses) with ``PYTHONPATH`` stripped of this repository (so it cannot import the
repository and loads the checkpoint's bundled code) and its own ``HF_MODULES_CACHE`` under ``workdir``; its output
goes to ``workdir/server.log``.
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

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def environment_without_repo(environ: dict[str, str]) -> dict[str, str]:
    """``environ`` with every ``PYTHONPATH`` entry that is this repository (or empty, i.e. the working directory)
    removed, and no other ``PYTHON*`` variable (``PYTHONSTARTUP`` and the like could import it too)."""
    paths = [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO]
    env = {k: v for k, v in environ.items() if not k.startswith("PYTHON")}
    return env | ({"PYTHONPATH": os.pathsep.join(paths)} if paths else {})


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
def transformers_server(
    checkpoint: Path, workdir: Path, options: list[str], startup_seconds: float, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen, str]]:
    """Serve ``checkpoint`` with the extra command-line ``options`` (e.g. ``--device cpu``); yields the process and
    its base URL once it is healthy, and stops it on exit."""
    port, log = free_port(), workdir / "server.log"
    server_env = environment_without_repo(dict(os.environ))
    server_env |= {"HF_MODULES_CACHE": str(workdir / "hf_modules"), "PYTHONUNBUFFERED": "1", **(env or {})}
    command = [
        sys.executable,
        "-m",
        "transformers.cli.transformers",
        "serve",
        str(checkpoint),
        "--trust-remote-code",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *options,
    ]
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
