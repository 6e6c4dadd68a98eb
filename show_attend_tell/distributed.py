"""The process group under torchrun, for training and for the sharded commands (`sat caption --out`,
`sat features`): rank and world size, sums and gradient means over the ranks, the group's end, a worker's exit.
Everything here is a no-op in one process."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

import torch
import torch.distributed as dist


def distributed() -> tuple[int, int]:
    """(rank, world size) under torchrun, (0, 1) otherwise; initialises the process group once. With GPUs the
    backend is NCCL and each process takes the GPU of its LOCAL_RANK ("cuda" then means that one)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def global_sums(world_size: int, device: torch.device, *values: float) -> list[float]:
    """Each value summed over the ranks (itself in one process)."""
    totals = torch.tensor(values, dtype=torch.float64)
    if world_size > 1:
        if dist.get_backend() == "nccl":  # NCCL reduces GPU tensors only
            totals = totals.to(device)
        dist.all_reduce(totals)
    return totals.tolist()


def average_gradients(parameters: Iterable[torch.nn.Parameter], world_size: int) -> None:
    """The one gradient sync, for both objectives: every rank's gradients become their mean, in one all-reduce
    of one flat buffer. Each rank's loss is normalised by the global batch over the world size, so the mean is
    the single-process gradient."""
    if world_size == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def end_process_group(world_size: int) -> None:
    """Wait for every rank, then end the group: a rank that exits while another still saves can abort in gloo's
    teardown."""
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


def exit_worker(code: int = 0):
    """End a torchrun worker whose work is saved, skipping the interpreter's teardown.

    gloo's threads can outlive destroy_process_group, and their destruction during teardown aborted a worker
    now and then (SIGABRT, "terminate called without an active exception"; 3 of about 60 runs of the
    two-process test on 2026-11-26) after training had finished, and torchrun then reported the run as failed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
