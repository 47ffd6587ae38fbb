"""bench/step.sh, the timed step of the GPU scripts: at its limit a step gets SIGUSR1 (a Python tool prints where it
waits, ``tools.cli.run_cli``), and its status and log name the step."""

import subprocess
import sys

from .conftest import REPO


def test_a_step_past_its_limit_leaves_its_stack_in_the_log(tmp_path):
    program = (
        "import faulthandler, signal, time\n"
        "faulthandler.register(signal.SIGUSR1, all_threads=True)\n"  # as run_cli does
        "def sleeping_here():\n"
        "    time.sleep(4)\n"
        "sleeping_here()\n"
    )
    script = f'. bench/step.sh; out="{tmp_path}"; step slow 1 "{sys.executable}" -c "$0"'
    done = subprocess.run(["bash", "-c", script, program], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.stdout.startswith("=== slow: rc=124 in "), done.stdout  # timed out, though it went on afterwards
    assert "in sleeping_here" in (tmp_path / "slow" / "log").read_text()
