"""The run's torch CPU thread count (``cpu_threads: auto | N | 0``) and OpenMP's wait policy.

Nothing here imports torch at module level: :func:`prefer_passive_openmp_wait` must run
before torch loads, and ``mneme --help`` imports this module.
"""

from __future__ import annotations

import os
import sys

from mneme.app.core.errors import ConfigError

CPU_THREADS_HELP = (
    "torch's intra-op CPU threads: auto (one thread for a model under 2M parameters, else "
    "one per usable core; see README 'CPU threads'), a number, or 0 for torch's own default "
    "(one per core); OMP_NUM_THREADS, when set, wins"
)


def apply_cpu_threads(setting: int | str, parameters: int = 0, processes: int = 1) -> None:
    """Set torch's CPU thread count for the run (``cpu_threads``); ``auto`` decides from
    the model's ``parameters`` (0 while it is not built yet: one thread) and the number of
    the run's ``processes`` on this machine (DDP ranks share its cores).

    Measured on the 2-core machine (``benchmarks/thread_crossover.py``,
    ``benchmarks/cpu_threads.py``, RESULTS.md 'CPU threads by model size'): torch's default
    (one OpenMP thread per core, idle threads spinning) is the fastest on an idle machine and
    2.1-5.7x slower than one thread where another process keeps a core busy. With the passive
    wait policy that ``mneme`` sets before torch loads, two threads lose to one on the MLPs
    under 2M parameters even on an idle machine (1.25-4.6x) and pay from about 5M on an idle
    machine (0.72-1.02x); with the cores contended they lose at every size (1.07-1.9x). Hence
    one thread below 2M parameters, every usable core above, and one thread where the policy
    could not be set (torch already imported, or a user's ``OMP_WAIT_POLICY``). A user's
    ``OMP_NUM_THREADS`` wins.
    """
    if os.environ.get("OMP_NUM_THREADS") or setting == 0:
        return
    if isinstance(setting, int) and setting < 0:
        raise ConfigError(f"cpu_threads: got {setting!r}; use auto, 0 (torch's default) or N > 0")
    import torch

    if setting == "auto":
        setting = auto_cpu_threads(_PASSIVE_WAIT, parameters, processes)
    torch.set_num_threads(setting)


def auto_cpu_threads(passive_wait: bool, parameters: int, processes: int = 1) -> int:
    """``cpu_threads: auto``: the cores this process may run on, shared among the run's
    ``processes``, for a model of at least ``AUTO_PARALLEL_PARAMETERS`` parameters while
    idle OpenMP threads sleep (passive wait); else one thread."""
    if not passive_wait or parameters < AUTO_PARALLEL_PARAMETERS:
        return AUTO_CPU_THREADS
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    cores = len(usable) if usable else os.cpu_count() or 1
    return max(1, cores // max(1, processes))


def parameter_count(model) -> int:
    """All parameters, frozen ones included (they cost forward passes); lazy ones skipped."""
    from torch.nn.parameter import is_lazy

    return sum(p.numel() for p in model.parameters() if not is_lazy(p))


AUTO_PARALLEL_PARAMETERS = 2_000_000  # `auto` threads a model this large (see above)
AUTO_CPU_THREADS = 1  # without the passive wait policy
# Whether this process's OpenMP runtime reads OMP_WAIT_POLICY=PASSIVE: set by `main` before
# torch is imported, or the user's own setting.
_PASSIVE_WAIT = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"


def prefer_passive_openmp_wait() -> None:
    """Before torch (and its OpenMP runtime) loads: idle threads sleep instead of spinning,
    unless the user chose a wait policy. The runtime reads the variable once, at load."""
    global _PASSIVE_WAIT
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    _PASSIVE_WAIT = True
