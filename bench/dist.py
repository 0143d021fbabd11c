"""The run's view of torch.distributed: rank, world size, barrier, broadcast, mean. One small module so
the spine stays readable and methods never see it.

    torchrun --nproc-per-node=N -m bench.run ...        (also: python -m torch.distributed.run ...)
    python -m bench.run -m cluster=slurm cluster.gpus_per_node=8 device=cuda ...   (one task per GPU)

A process group is joined when the launcher says there are ranks: torchrun sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT (even for one process: `torchrun --nproc-per-node=1` runs
the data-parallel code path with N = 1); a SLURM job of several tasks started by submitit gets them
from submitit's TorchDistributedEnvironment (master: the job's first host; port: a function of the
job id). NCCL when the run's device is CUDA, gloo on the CPU. Without either every function is the
one-process answer (rank 0 of 1) and nothing is initialised.

Timeout: while rank 0 alone plans (bench.run) the others wait in a collective; BENCH_DIST_TIMEOUT_MIN
(default 180) bounds that wait, so set it above the longest plan() of a sweep (OBS-Diff on XL/2).
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as td


def world() -> int:
    return td.get_world_size() if active() else 1


def rank() -> int:
    return td.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    """A process group is in use (N >= 1 ranks launched as such): the fine-tune wraps its model in DDP."""
    return td.is_available() and td.is_initialized()


def _slurm_tasks() -> int:
    return int(os.environ.get("SLURM_NTASKS", "1") or 1) if os.environ.get("SLURM_JOB_ID") else 1


def init(device: str) -> None:
    """Join the process group when launched with ranks (above). On CUDA each rank's current device
    becomes cuda:<LOCAL_RANK>, so the config's "cuda" (part of the run's hash) means this rank's GPU."""
    if active():
        return
    if "WORLD_SIZE" not in os.environ and _slurm_tasks() > 1 and os.environ.get("SUBMITIT_EXECUTOR"):
        from submitit.helpers import TorchDistributedEnvironment
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)  # every task sees the node's GPUs
        _resolvable_master()
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = timedelta(minutes=float(os.environ.get("BENCH_DIST_TIMEOUT_MIN", "180")))
    td.init_process_group("nccl" if cuda else "gloo", timeout=timeout)


def _resolvable_master() -> None:
    """submitit names the master by the job's first node name, which not every cluster resolves (node
    names that are no host names); then the address of the node that launched the tasks (task 0's
    node: SLURM_LAUNCH_NODE_IPADDR) is used."""
    import socket

    try:
        socket.getaddrinfo(os.environ["MASTER_ADDR"], None)
    except (OSError, KeyError):
        if os.environ.get("SLURM_LAUNCH_NODE_IPADDR"):
            os.environ["MASTER_ADDR"] = os.environ["SLURM_LAUNCH_NODE_IPADDR"]


def barrier() -> None:
    if world() > 1:
        td.barrier()


def broadcast(obj):
    """`obj` as rank 0 has it, on every rank (any picklable object)."""
    if world() == 1:
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


def gather_all(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    td.all_gather_object(out, obj)
    return out


def mean(x: torch.Tensor) -> float:
    """The mean over ranks of a scalar tensor (each rank's value of an equal-sized share)."""
    if world() == 1:
        return float(x)
    y = x.detach().float().reshape(1).clone()
    td.all_reduce(y)
    return float(y) / world()


def close() -> None:
    """Leave the process group. Garbage (a fine-tune's DistributedDataParallel wrappers, which hold
    the group) is collected first, so the group's threads end here and not while the interpreter
    shuts down (where gloo's can abort the process)."""
    if active():
        import gc

        gc.collect()
        td.destroy_process_group()
