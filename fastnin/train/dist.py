"""Multi-process training: torchrun / DistributedDataParallel.

    torchrun --nproc_per_node 2 -m fastnin.train --model nin_cifar10 --batch-size 128 ...

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; when WORLD_SIZE > 1 the
process group is initialized from them (gloo for CPU training, nccl for CUDA). Each rank trains the
same model (same --seed, and DDP broadcasts rank 0's parameters at wrap time anyway) on its own
shard of every epoch's shuffled order (DistributedSampler).

Batch-size convention: --batch-size is the GLOBAL batch, the number of images per optimizer step
summed over all ranks; each rank loads --batch-size / WORLD_SIZE images (it must divide). Since
each rank's loss is the mean over its local batch and DDP averages the gradients over the ranks,
every step's gradient is the mean over the global batch, exactly as in single-process training with
the same --batch-size: the same --lr works for any number of processes. With one process the same
sampler yields the same order, so global batch k holds the same images whatever the world size
(DistributedSampler gives rank r positions r, r+W, r+2W, ... of the epoch's permutation, and the
k-th local batches of all ranks together are positions [kB, (k+1)B) of it). The one difference:
DistributedSampler pads the epoch to a multiple of WORLD_SIZE by repeating a few images.

Only rank 0 prints, writes checkpoints and the summary; metrics are summed over ranks first.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as td

__all__ = ["DistInfo", "init", "shutdown", "all_sum", "params_in_sync"]


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None  # gloo / nccl, None when not distributed

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"fastnin.train: environment variable {name}={v!r} is not an integer") from None


def init(device: str) -> tuple[DistInfo, torch.device]:
    """Initialize the process group when launched by torchrun with WORLD_SIZE > 1.

    Returns the DistInfo and the device this rank trains on: for CUDA, cuda:LOCAL_RANK (one GPU per
    process, the torchrun convention); an explicit index in --device is honoured only without DDP.
    """
    world = _env_int("WORLD_SIZE", 1)
    dev = torch.device(device)
    if world <= 1:
        return DistInfo(), dev
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise ValueError(f"fastnin.train: WORLD_SIZE={world} but {name} is not set; launch with torchrun")
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"fastnin.train: LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    elif dev.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"fastnin.train: distributed training supports --device cpu or cuda, not {device!r}")
    if not td.is_initialized():
        td.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                              timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, backend=backend), dev


def shutdown(info: DistInfo) -> None:
    if info.enabled and td.is_initialized():
        td.destroy_process_group()


def all_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """Sum a few numbers over the ranks (float64; identity without DDP)."""
    if not info.enabled:
        return list(values)
    # gloo reduces CPU tensors, nccl CUDA tensors.
    t = torch.tensor(values, dtype=torch.float64, device=device if info.backend == "nccl" else "cpu")
    td.all_reduce(t)
    return t.tolist()


def params_in_sync(model: torch.nn.Module, info: DistInfo, device: torch.device) -> bool:
    """Whether every rank holds the same parameters (a sum of per-parameter checksums, compared via
    all_reduce of min and max): DDP should guarantee it; the summary reports it."""
    if not info.enabled:
        return True
    with torch.no_grad():
        s = torch.stack([p.detach().double().sum() + p.detach().double().abs().sum() for p in model.parameters()])
    s = s.to(device if info.backend == "nccl" else "cpu")
    lo, hi = s.clone(), s.clone()
    td.all_reduce(lo, op=td.ReduceOp.MIN)
    td.all_reduce(hi, op=td.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))
