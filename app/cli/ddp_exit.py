"""How the processes of a failed DDP run end: together, and within a bound.

Each rank prints its own one-line error (:data:`mneme.app.cli.messages.DDP_FAILURES`:
another process killed or crashed, a process that did not answer, parameters DDP cannot
reduce). What this module adds is that no process outlives the failure:

- a killed or crashed peer is seen at once (gloo/NCCL close the connection);
- a stopped or hung peer is seen when the collective times out, after ``MNEME_DDP_TIMEOUT``
  seconds (600 by default; :func:`mneme.app.cli.commands.ddp_with_timeout`);
- then the failing process kills what would be left behind: every process it started (rank
  0 starts the other ranks; Lightning's own watcher kills rank 0 only when a child *exits*,
  within 5 s, and never sees a stopped one), and a launching rank 0 that is stopped (no
  process watches it), and it exits without the interpreter's exit handlers, since torch's
  process-group teardown would wait for the collectives no peer answers.

So every process of the run ends within ``MNEME_DDP_TIMEOUT`` + ~5 s of a failure.
"""

from __future__ import annotations

import contextlib
import os
import sys

# Collective timeout of the DDP strategies the CLI builds (a frozen rank ends the run); here,
# below both the parser and the messages that name it.
DDP_TIMEOUT_S = int(os.environ.get("MNEME_DDP_TIMEOUT", "600"))


def in_ddp_run() -> bool:
    """Whether this process belongs to an initialized torch.distributed process group."""
    if "torch.distributed" not in sys.modules:  # never imported: no run of many processes
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def end_failed_ddp_run(status: int) -> None:
    """In a DDP run, kill the processes this one would leave behind and exit with
    ``status`` at once; outside one, return (the caller exits as usual)."""
    if not in_ddp_run():
        return
    import psutil

    me = psutil.Process()
    doomed = me.children(recursive=True)  # ranks it launched, DataLoader workers
    parent = me.parent()
    with contextlib.suppress(psutil.Error):
        # the launching rank 0 runs this same command; stopped, it would never end
        if parent is not None and parent.status() == psutil.STATUS_STOPPED:
            args, command = sys.argv[1:], parent.cmdline()
            if args and command[len(command) - len(args) :] == args:
                doomed.append(parent)
    for process in doomed:
        with contextlib.suppress(psutil.Error):
            process.kill()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError):
            stream.flush()
    os._exit(status)
