"""Multi-process runs under ``torchrun``: NCCL on GPUs, Gloo on CPUs.

Every rank synthesizes its own images (its own seed), keeps its own memory, and trains the same
student under DistributedDataParallel, so gradients average over all ranks' samples. Rank 0 logs,
evaluates and writes the run folder; every rank checkpoints its own synthesizer and memory.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device_name: str) -> torch.device | None:
    """Join the process group torchrun describes; returns this rank's device (None: not distributed)."""
    if not launched_by_torchrun():
        return None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available() or device_name.startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def any_flag(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on any rank (one small all-reduce)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def max_value(x: float, device: torch.device) -> float:
    """The largest ``x`` over the ranks (one small all-reduce), e.g. a wall time every rank must agree on."""
    if world_size() == 1:
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def gather_objects(obj: Any) -> list[Any]:
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def tensor_digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cleanup(synchronize: bool = True) -> None:
    """Leave the process group together (``synchronize``; after a failure a rank leaves at once, since its
    peers may be inside another collective): every rank waits for the others (rank 0 writes the run folder
    after the others are done), drops what still holds the group (DistributedDataParallel's reducer and
    its pending work) and only then destroys it. A rank that tore its group down while a peer still held
    its connections, or left the reducer to the interpreter's shutdown, could abort with Gloo's
    "terminate called without an active exception" and fail the whole launch."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    import gc

    gc.collect()
    if synchronize:
        try:
            dist.barrier()
        except RuntimeError:  # a peer is already gone (it failed): its error is the one to report
            pass
    dist.destroy_process_group()
