"""Process group and data-parallel wrapping (FSDP2 or DDP).

FSDP2's ``fully_shard`` is applied per decoder block and then to the root, the granularity
at which all-gathers overlap with compute. The three sharding choices map onto it:
``full`` reshards parameters after forward (ZeRO-3-like), ``grad_op`` keeps them gathered
until backward is done (ZeRO-2-like: more memory, one all-gather per step instead of two),
``hybrid`` shards over a 2-D mesh, within groups of ``shard_group_size`` ranks (a node's
fast interconnect) and replicates across them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn

from kubeforge_runtime.config import ParallelismConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Topology:
    """Who this process is, from torchrun's environment (a single process when absent)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    #: under torchrun: a process group is created even at world size 1
    launched: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Topology:
        env = os.environ if env is None else env
        if "RANK" not in env or "WORLD_SIZE" not in env:
            return cls()
        return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")),
                   int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])), True)


def pick_device(topo: Topology) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(topo.local_rank)
        return torch.device("cuda", topo.local_rank)
    return torch.device("cpu")


def init_process_group(topo: Topology, device: torch.device, timeout_s: float) -> None:
    """NCCL for GPU tensors plus gloo for CPU ones (checkpoint metadata, objects), or gloo
    alone on the CPU. The timeout is short on purpose: gloo's default of 30 minutes would
    keep a pod of a broken job busy long after a peer died."""
    if not topo.launched or dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=dt.timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)


def wrap_model(model: nn.Module, par: ParallelismConfig, topo: Topology, device: torch.device,
               param_dtype: torch.dtype) -> nn.Module:
    """Shard or replicate ``model`` (already on ``device``) over the process group.

    At world size 1 the model is returned as it is: sharding over one rank only adds hooks
    and copies (the "single" benchmark measures exactly this path)."""
    if topo.world_size == 1:
        return model
    if par.sharding == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if par.sharding == "hybrid":
        group = par.shard_group_size or topo.local_world_size
        mesh = init_device_mesh(device.type, (topo.world_size // group, group),
                                mesh_dim_names=("dp_replicate", "dp_shard"))
    else:
        mesh = init_device_mesh(device.type, (topo.world_size,), mesh_dim_names=("dp_shard",))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) \
        if param_dtype != torch.float32 else MixedPrecisionPolicy()
    offload = OffloadPolicy()
    if par.cpu_offload and device.type == "cuda":
        offload = CPUOffloadPolicy()  # pinned host memory, copied to the GPU per block
    elif par.cpu_offload:
        log.info("parallelism.cpu_offload has no effect on the CPU: parameters already live in host memory")
    reshard = par.sharding != "grad_op"
    for block in model.layers:  # type: ignore[union-attr]
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp, offload_policy=offload)
    # the root's parameters (embeddings, final norm, head) are needed again first in backward
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=mp, offload_policy=offload)
    return model


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip the gradient reduction on all but the last micro-batch of a step."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
    elif isinstance(model, DistributedDataParallel):
        model.require_backward_grad_sync = enabled
