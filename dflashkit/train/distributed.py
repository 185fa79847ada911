"""Process group and model wrapping. torchrun (under srun on Slurm) sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR;
without them this is a single process. NCCL on GPUs, gloo on CPU. DDP replicates the draft; FSDP2 shards it (for
hidden sizes where the replicated fp32 weights and Adam states stop fitting comfortably)."""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
        log.info("process group: %s, rank %d of %d (local %d)", backend, rank, world, local_rank)
    return Dist(rank, world, local_rank, device)


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, d: Dist, mode: str, bf16: bool = False) -> nn.Module:
    """`mode`: "ddp" or "fsdp" (FSDP2: each decoder layer is one shard unit, the rest is the root's).
    `bf16` (training under bf16 autocast): FSDP2 gathers the weights as bf16 and reduces gradients in fp32, so the
    all-gathers and the unsharded weights take half the bytes. Autocast casts every matmul's weight to bf16 anyway and
    on GPU the activations are bf16 (the target's embeddings are), so the numbers are autocast's; where activations
    are fp32 (CPU) the norm weights' gradients get rounded to bf16 too (a 1e-4 relative change in the loss)."""
    if not d.enabled:
        return model
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # Inputs are left as they come (autocast decides the compute dtype), so only the weights' storage changes.
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
              if bf16 else MixedPrecisionPolicy())
        for layer in model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
