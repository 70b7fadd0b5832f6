"""`runs` names the worker holding an unfinished run's lease in its `running in` column.
A worker of this host that was killed (kill -9: it never let go) still holds the lease of
a Redis or PostgreSQL store until the lease expires; the column showed it as if it ran
the run now. It says the process exited, and what to do."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from stroma.cli import format_runs
from stroma.timeline import RunSummary


def test_a_holder_whose_process_exited_is_shown_as_exited() -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    dead = f"{socket.gethostname()}:{gone}:0000abcd/0000beef"
    alive = f"{socket.gethostname()}:{os.getpid()}:0000abcd/0000beef"
    elsewhere = f"another-host-{os.getpid()}:{gone}:0000abcd/0000beef"
    table = format_runs([
        RunSummary("killed", "running/crashed", held_by=dead),
        RunSummary("running", "running/crashed", held_by=alive),
        RunSummary("remote", "running/crashed", held_by=elsewhere),
    ])
    lines = {line.split()[0]: line for line in table.splitlines()[2:]}
    assert lines["killed"].endswith(f"{dead} (exited: resume the run once its lease expires)")
    assert lines["running"].endswith(alive)  # (this process runs: no more said)
    assert lines["remote"].endswith(elsewhere)  # (another host's process: cannot tell)
