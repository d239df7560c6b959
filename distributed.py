"""Multi-GPU / multi-node plumbing for nested_reft.py on torch.distributed, launched by torchrun.

    torchrun --nproc_per_node=8 nested_reft.py --config gsm8k_7b

One process per GPU (nccl) or per CPU worker (gloo). Rank, world size and local device come from torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Without torchrun (or WORLD_SIZE=1) every
function here is the identity / a no-op, so the single-process path runs exactly the code it always ran.

The engines are PyTorch's own (`parallel` in the config):
    ddp   DistributedDataParallel: every rank holds the whole model, grads and AdamW state (1.5B).
    fsdp  FSDP2 (torch.distributed.fsdp.fully_shard) per decoder layer + root: parameters, gradients and AdamW
          state sharded over the ranks; bf16 all-gathered weights (MixedPrecisionPolicy) with fp32
          reduce-scatter; sharded master weights and AdamW state stay fp32 (7B).

Gradient scale: each rank's loss is already divided by the GLOBAL normaliser (token count summed over ranks),
so the full-batch gradient is the SUM of the ranks' gradients. DDP and FSDP average over ranks, hence
`backward` multiplies the loss by the world size: N ranks with B/N prompts take the step of 1 process with B.
"""
from __future__ import annotations

import contextlib
import copy
import os

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from qwen2 import Qwen2

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)   # gathered, on rank 0's CPU (empty elsewhere)


def init(device: torch.device) -> torch.device:
    """Join the process group torchrun describes; return this process's device (cuda:LOCAL_RANK on GPUs).
    Backend: nccl on cuda, gloo on cpu. Without torchrun: nothing happens, `device` is returned unchanged."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return device


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the only process that logs and writes files."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# wrapping


def wrap(model: torch.nn.Module, parallel: str, device: torch.device, dtype: torch.dtype,
         skips_layers: bool = False) -> torch.nn.Module:
    """DDP or FSDP2 around a Qwen2 (build the optimizer AFTER this: FSDP replaces the parameters by shards).
    skips_layers: some backward passes run a nested model (SFT with sft_skip_prob > 0), so DDP must expect
    parameters without a gradient. One process: the model itself."""
    if world_size() == 1:
        return model
    if parallel == "ddp":
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       gradient_as_bucket_view=True,          # no second copy of the grads
                                       find_unused_parameters=skips_layers)
    if parallel != "fsdp":
        raise ValueError(f"parallel={parallel!r}: expected ddp or fsdp")
    mesh = init_device_mesh(device.type, (world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32)
    for layer in model.model.layers:                       # one all-gather / reduce-scatter unit per layer
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    return fully_shard(model, mesh=mesh, mp_policy=mp)     # root: embeddings, final norm, lm_head


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Qwen2 itself, for generate() and .config (FSDP2 changes the module's class in place)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """FSDP: all-gather every layer ONCE for a whole sampling phase (rollouts, evaluation) and reshard after,
    instead of an all-gather per layer per decode step (costs one unsharded bf16 copy of the weights).
    No collective runs inside, so ranks may call generate() a different number of times. Otherwise nothing."""
    if not isinstance(model, FSDPModule):
        yield
        return
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]     # root first, then the layers
    for m in units:
        m.unshard()
        if m is not model:
            m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in units:
            if m is not model:
                m.set_reshard_after_forward(True, recurse=False)
            m.reshard()


def frozen_copy(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A no-grad copy of the current weights (the KL reference). One process / DDP: a deep copy of the Qwen2
    (no DDP wrapper: it gets no gradients). FSDP: a second FSDP model holding a copy of this rank's shards."""
    net = unwrap(model)
    if not isinstance(model, FSDPModule):
        return copy.deepcopy(net).requires_grad_(False)
    with torch.device("meta"):
        ref = Qwen2(net.config).requires_grad_(False)
    ref = shard_like(model, ref, device, dtype)
    ref.to_empty(device=device)
    ref.load_state_dict(model.state_dict())                # shard to shard: no gather
    for name, buf in net.named_buffers():                  # buffers: not in the state dict if non-persistent
        ref.get_buffer(name).copy_(buf)
    return ref


def shard_like(model: torch.nn.Module, ref: torch.nn.Module, device, dtype) -> torch.nn.Module:
    """A frozen model laid out like the trained one: sharded when `model` is FSDP, else `ref` as is. Its root
    reshards after forward too (it has no backward that would free it)."""
    if not isinstance(model, FSDPModule):
        return ref
    ref = wrap(ref.requires_grad_(False), "fsdp", device, dtype)
    ref.set_reshard_after_forward(True)
    return ref


def grad_sync(model: torch.nn.Module, last: bool):
    """Context for one micro-batch's forward + backward. DDP: gradients accumulate locally and are all-reduced
    only in the backward of the `last` micro-batch of a step. FSDP reduce-scatters every micro-batch (so
    gradients stay sharded); one process: nothing."""
    if isinstance(model, DistributedDataParallel) and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def backward(loss: torch.Tensor) -> None:
    """loss.backward(), times the world size under DDP/FSDP (they AVERAGE gradients over ranks, while the
    losses, each divided by the global normaliser, must SUM to the full-batch loss)."""
    (loss * world_size() if world_size() > 1 else loss).backward()


# ----------------------------------------------------------------------------------------------------------
# data and metrics


def shard(items: list) -> list:
    """This rank's contiguous slice of a list every rank holds in the same order (len divisible by world)."""
    w, r = world_size(), rank()
    if len(items) % w:
        raise ValueError(f"{len(items)} items cannot be split evenly over {w} processes")
    n = len(items) // w
    return items[r * n:(r + 1) * n]


def all_reduce_sum(x):
    """Sum of a Python int or float over the ranks (x itself in one process)."""
    if world_size() == 1:
        return x
    t = torch.tensor(x, dtype=torch.int64 if isinstance(x, int) else torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return type(x)(t.item())


def all_gather(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (any picklable object)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """The ranks' [n_r, ...] tensors concatenated along dim 0 in rank order (CPU); dim 1 right-padded with
    zeros / False to the longest. `t` itself in one process."""
    if world_size() == 1:
        return t
    parts = all_gather(t.cpu())
    if t.dim() > 1:
        T = max(p.shape[1] for p in parts)
        parts = [torch.cat([p, p.new_zeros((p.shape[0], T - p.shape[1], *p.shape[2:]))], 1) for p in parts]
    return torch.cat(parts)


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------
# checkpoints (every rank calls these: under FSDP they are collectives; rank 0 gets the full result)


def full_model(model: torch.nn.Module) -> torch.nn.Module | None:
    """A module with all the weights, for rank 0 to save_pretrained(). One process / DDP: the model itself.
    FSDP: the full fp32 state dict gathered to rank 0's CPU, loaded into a CPU Qwen2 there; None elsewhere."""
    if not isinstance(model, FSDPModule):
        return unwrap(model)
    sd = get_model_state_dict(model, options=FULL)
    if not is_main():
        return None
    with torch.device("meta"):
        full = Qwen2(model.config)
    full.load_state_dict(sd, strict=True, assign=True)
    if model.config.tie_word_embeddings:
        full.lm_head.weight = full.model.embed_tokens.weight
    return full


def save_pretrained(model: torch.nn.Module, path, also_write=None) -> None:
    """Rank 0 writes the HF-layout model (under FSDP a collective: every rank calls it); also_write: see
    Qwen2.save_pretrained."""
    full = full_model(model)
    if is_main():
        full.save_pretrained(path, also_write=also_write)


def optimizer_state_dict(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """opt.state_dict(), except under FSDP: the full (unsharded, fp32, keyed by parameter name) AdamW state
    gathered to rank 0's CPU with torch.distributed.checkpoint's helpers ({} on the other ranks)."""
    if isinstance(model, FSDPModule):
        return get_optimizer_state_dict(model, opt, options=FULL)
    return opt.state_dict()


def load_optimizer_state_dict(model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of optimizer_state_dict; under FSDP every rank passes the full state and keeps its shard.
    Either engine takes the other's state (a resume that switches `parallel`): opt.state_dict() keys the parameters
    by their index in model.parameters() (the optimizer's order, make_optimizer), the FSDP state by their name, and
    opt.load_state_dict matches them by position, whatever their keys."""
    if isinstance(model, FSDPModule):
        if any(isinstance(p, int) for g in state["param_groups"] for p in g["params"]):     # saved by opt.state_dict()
            names = [n for n, _ in unwrap(model).named_parameters()]
            state = {"state": {names[i]: s for i, s in state["state"].items()},
                     "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(state)
