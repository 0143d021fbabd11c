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

Cancel. `scancel` (and a scheduler that kills a job: a time limit reached without the signal, a
preemption notice on clusters that preempt with SIGTERM) sends SIGTERM, then SIGKILL after the
cluster's KillWait. submitit's job handler only logs SIGTERM ("Bypassing signal SIGTERM"), so a
cancelled run would go on computing through the grace time and could even write its row after the
user cancelled it. Here the first of SIGUSR2 and SIGTERM decides how the job leaves
(guard_requeue_signal):
  * SIGUSR2 first: submitit checkpoints and requeues (above). The SIGTERM that `scontrol requeue`
    itself sends to the job, often while the handler is still running, is ignored, as are later
    USR2s, by this process and by the `scontrol requeue` it starts: the requeue always completes.
  * SIGTERM first: the run stops at once (SystemExit(143) in the job's main thread: no row, no
    error.json, as for SIGKILL); its stored stages (plan, fine-tune checkpoints, samples) stay, and
    a later USR2 is ignored. Submitting the same sweep again skips the finished runs and resumes the
    others from their stored stages; a scheduler that requeues on preemption resumes them the same way.
`cluster.on_sigterm=ignore` (env BENCH_ON_SIGTERM) restores submitit's bypass for clusters that
send SIGTERM as an early notice before the requeue signal. A job killed outright (SIGKILL, a node
failure) leaves no row either and resumes the same way.
"""
from __future__ import annotations

import os
import signal
import sys


ON_SIGTERM_ENV = "BENCH_ON_SIGTERM"  # stop (default) | ignore; set by cluster.on_sigterm (conf/cluster/slurm.yaml)
STOP_EXIT = 128 + signal.SIGTERM    # the exit status of a process killed by SIGTERM


def guard_requeue_signal() -> bool:
    """Install the job's signal policy on top of submitit's handlers (module docstring: Cancel).

    1. The requeue signal (SIGUSR2) runs submitit's handler once per process. slurmstepd may
       deliver one `scancel --signal` / `--signal=USR2@T` twice within milliseconds (to the task and
       to its process group); submitit's handler is not re-entrant, and the second call, arriving
       while the first writes its checkpoint pickle, fails with "A temporary saved file already
       exists" and turns the requeue into a failed run (facebookincubator/submitit#1617).
    2. SIGTERM stops the run now (SystemExit(143)) unless BENCH_ON_SIGTERM=ignore.
    Whichever comes first decides: once a requeue is being handled, SIGTERM (sent by the requeue
    itself) and further USR2s are ignored; once a stop began, USR2 is ignored. Outside a submitit
    job (no Python handler on the requeue signal) it does nothing. Returns whether it installed."""
    sig = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
    if sig is None:
        return False
    handler = signal.getsignal(sig)
    if not callable(handler) or getattr(handler, "_bench_once", False):
        return False
    policy = os.environ.get(ON_SIGTERM_ENV, "stop")
    if policy not in ("stop", "ignore"):
        raise ValueError(f"{ON_SIGTERM_ENV}={policy!r}: use stop or ignore (cluster.on_sigterm)")
    leaving: list[int] = []  # the first requeue signal or SIGTERM: how this process leaves

    def _say(msg: str) -> None:
        print(f"bench.launch: {msg}", file=sys.stderr, flush=True)

    def leave(signum) -> bool:
        """The first requeue signal or SIGTERM decides how this process leaves (False: one did
        already). From then on both are ignored at the OS level, not in a Python handler, so that
        the children the job starts inherit the ignore (a handler is reset to the default action in
        a child; SIG_IGN is kept across exec): slurmstepd signals every process of the step, and a
        late second USR2, or the SIGTERM that the requeue itself sends, would otherwise kill the
        `scontrol requeue` that submitit's handler runs before it requeues; check_call then raises
        inside the run, hydra's run_job records that as the run's failure and the job ends as
        completed, without a requeue (seen in CI). `leaving` covers a second signal that Python
        delivers before SIG_IGN is in place."""
        if leaving:
            _say(f"{signal.Signals(signum).name} ignored: already leaving on {signal.Signals(leaving[0]).name}")
            return False
        leaving.append(signum)
        signal.signal(sig, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return True

    def once(signum, frame):
        if leave(signum):
            _say(f"{signal.Signals(signum).name}: checkpointing and requeueing; SIGTERM and further "
                 f"{signal.Signals(sig).name} are ignored from now on")
            handler(signum, frame)

    def stop(signum, frame):
        if leave(signum):
            _say("SIGTERM (job cancelled or killed by the scheduler): stopping the run now; no row is "
                 "written, its stored stages stay and a resubmission resumes from them")
            raise SystemExit(STOP_EXIT)

    once._bench_once = True
    signal.signal(sig, once)
    if policy == "stop" and sig != signal.SIGTERM:
        signal.signal(signal.SIGTERM, stop)
    return True
