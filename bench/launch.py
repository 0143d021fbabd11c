"""How runs are launched, and how a SLURM job survives preemption and time limits.

The `cluster` config group picks hydra's launcher (bench/conf/cluster/):

    local            in this process, one run after another (hydra's basic launcher; the default)
    slurm            a sweep (-m) becomes one SLURM job array, one task per run (hydra-submitit-launcher)
    submitit_local   the same submitit path as slurm, as local subprocesses (no scheduler)

    python -m bench.run -m cluster=slurm experiment=default_suite cluster.partition=<partition>

Requeue and resume. submitit installs a SIGUSR2 handler in every job. SLURM sends SIGUSR2
`cluster.signal_delay_s` before the time limit (`--signal`), and a preempting scheduler can send it
too. The handler calls the submitted callable's `checkpoint()`; hydra-submitit-launcher 1.2.0's
launcher has one that returns the same call (the same sweep overrides) as a DelayedSubmission, which
submitit stores and requeues with `scontrol requeue`: the job keeps its id and starts again. A
time-limit requeue counts against `cluster.max_requeues` (the plugin's `max_num_timeout`, whose
default 0 would end the run instead); a preemption is not counted. Nothing else is needed because
a run's directory is a pure function of its resolved config (launcher and cluster keys excluded,
bench.results.NON_RESULT_KEYS), and every stage skips when its artifact exists: the requeued job
resumes at its last fine-tune checkpoint, and row.json (written last, atomically) appears once.

A job killed without the signal (scancel, a node failure) leaves no row; submitting the same sweep
again skips the finished runs and resumes the others.
"""
from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from pathlib import Path


def guard_requeue_signal() -> bool:
    """Make the installed requeue-signal handler (submitit's) run once per process.

    slurmstepd may deliver one `scancel --signal` / `--signal=USR2@T` twice within milliseconds (to
    the task and to its process group); submitit's handler is not re-entrant, and the second call,
    arriving while the first writes its checkpoint pickle, fails with "A temporary saved file
    already exists" and turns the requeue into a failed run (facebookincubator/submitit#1617).
    Once the first delivery is being handled the job is leaving (requeued, or failed), so later
    deliveries are dropped. Outside a submitit job (no Python handler installed) it does nothing.
    Returns whether a handler was wrapped."""
    sig = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
    if sig is None:
        return False
    handler = signal.getsignal(sig)
    if not callable(handler) or getattr(handler, "_bench_once", False):
        return False
    seen = []

    def once(signum, frame):
        if seen:
            return
        seen.append(signum)
        handler(signum, frame)

    once._bench_once = True
    signal.signal(sig, once)
    return True


@contextmanager
def file_lock(path):
    """Hold an exclusive advisory lock (flock) on `path` for the block. Concurrent jobs of a sweep
    that need the same missing artifact (the trained teacher, the scoring classifier) build it once:
    the first takes the lock, the others wait and then find it. A killed holder releases the lock."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
