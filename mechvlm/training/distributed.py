"""Data-parallel training on torch.distributed: DDP (or FSDP2) launched by ``torchrun``.

``torchrun --nproc_per_node N $(which mechvlm) finetune ...`` sets ``RANK`` /
``WORLD_SIZE`` / ``LOCAL_RANK``; `init_distributed` then joins the process group (NCCL on
CUDA, gloo on CPU). Each rank takes its slice of every global batch (`shard`), and the
gradient accumulation per rank is ``global_batch / (world_size * micro_batch)``, so the
global batch, and with it the weights, do not depend on the number of processes.

FSDP (`wrap_fsdp`): each transformer block is its own ``fully_shard`` unit and the root
holds the embedding, final norm and unembedding; the frozen vision tower is left out
(``ignored_params``: it runs replicated, under no_grad). Parameters, gradients and AdamW
states are then split over the ranks (full fine-tuning of a 3B model in bf16 with fp32
AdamW states needs about 40 GB on one GPU). torch's FSDP2 runs on gloo, so it is tested
on CPU as DDP is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this call created the process group (and `shutdown` ends it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1; an existing
    group is reused), else a single-process `DistInfo`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    if world <= 1:
        return DistInfo(device=dev)
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, device=dev,
                    owns_group=owns)


def shutdown(info: DistInfo) -> None:
    """End the process group if `init_distributed` created it (a caller's group stays)."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum a few floats over the ranks (fp64; identity on one process)."""
    if not info.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64,
                     device=info.device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def shard(indices: list[int], info: DistInfo) -> list[int]:
    """This rank's contiguous slice of a global batch (its size must divide evenly)."""
    if len(indices) % info.world_size:
        raise ValueError(f"a global batch of {len(indices)} does not split over {info.world_size} ranks")
    per = len(indices) // info.world_size
    return indices[info.rank * per:(info.rank + 1) * per]


def wrap_ddp(model, info: DistInfo):
    """`DistributedDataParallel` over the trainable (language-model) parameters."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def wrap_fsdp(model, info: DistInfo):
    """FSDP2: ``fully_shard`` every block, then the root (the vision tower ignored)."""
    from torch.distributed.fsdp import fully_shard

    ignored = set(model.vision.parameters()) if model.vision is not None else set()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model, ignored_params=ignored)
    return model


def full_state_dict(model, info: DistInfo, fsdp: bool) -> dict | None:
    """The model's full state dict (CPU tensors on rank 0 under FSDP; None on other ranks)."""
    if not fsdp:
        return {k: v.detach() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if info.is_main else None


def full_optimizer_state(model, optimizer, fsdp: bool) -> dict:
    """The optimizer state in a form `load_optimizer_state` restores (full under FSDP)."""
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                              cpu_offload=True))


def load_optimizer_state(model, optimizer, state: dict, fsdp: bool) -> None:
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
