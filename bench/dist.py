"""The run's view of torch.distributed: rank, world size, barrier, broadcast. One small module so the
spine stays readable and methods never see it.

    torchrun --nproc-per-node=N -m bench.run ...        (also: python -m torch.distributed.run ...)

With WORLD_SIZE > 1 in the environment (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) `init()` joins the process group: NCCL when the run's device is CUDA, gloo on the CPU.
Without it every function is the one-process answer (rank 0 of 1) and nothing is initialised.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as td


def world() -> int:
    return td.get_world_size() if td.is_available() and td.is_initialized() else 1


def rank() -> int:
    return td.get_rank() if td.is_available() and td.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init(device: str) -> None:
    """Join the process group when launched with WORLD_SIZE > 1. On CUDA each rank's current device
    becomes cuda:<LOCAL_RANK>, so the config's "cuda" (part of the run's hash) means this rank's GPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or td.is_initialized():
        return
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    td.init_process_group("nccl" if cuda else "gloo")


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


def close() -> None:
    if td.is_available() and td.is_initialized():
        td.destroy_process_group()
