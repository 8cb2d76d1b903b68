"""
FSDP2 sharding and checkpoints, shared by sft.py, rsft.py and grpo.py.

A checkpoint {path}/ holds the Hugging Face model (weights in the run's dtype, processor) for inference, and
trainer_state.json + trainer_state/rank{r}.safetensors (each rank's shard of the fp32 master weights and
AdamW state: a resume loads only its own shard, and no pickle is ever read). The whole directory is written
as {path}.tmp and renamed into place, so a kill leaves the previous checkpoint or the new one, never a mix.
"""

import os
import shutil

import torch
import torch.distributed as dist

from common import is_rank0, read_json, write_json


def shard(model, world_size, compute_dtype=torch.float32):
    """FSDP2: the vision tower, each decoder layer, then the root. The parameters stay in the dtype they were
    loaded in (fp32 for training: the master weights, and AdamW's state with them); with a lower compute
    dtype each unit all-gathers its weights in that dtype for forward and backward and reduces gradients in
    fp32 (MixedPrecisionPolicy, docs/spec.md §11). One process in fp32 keeps the plain model; one process
    with bf16 compute runs as a 1-rank group, so that it computes exactly what the 8-GPU run does."""
    if world_size == 1 and compute_dtype == torch.float32:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    if not dist.is_initialized():  # one process: a 1-rank group from an in-memory store
        backend = "nccl" if next(model.parameters()).is_cuda else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    mixed = compute_dtype != torch.float32
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if mixed else MixedPrecisionPolicy()
    fully_shard(model.model.visual, mp_policy=policy)  # its own unit: a frozen tower never shares a parameter group
    for layer in model.model.language_model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor's shard on this rank


def trainer_tensors(model, optimizer):
    """This rank's master weights and optimizer state as flat {name: tensor}."""
    out = {f"model/{n}": _local(p.detach()) for n, p in model.named_parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for k, v in optimizer.state.get(p, {}).items():
                out[f"optim/{names[id(p)]}/{k}"] = _local(v)
    return {k: v.detach().contiguous().cpu().clone() for k, v in out.items()}


def save_checkpoint(model, processor, optimizer, step, path, world_size, save_dtype=torch.float32, extra=None):
    """The checkpoint of a training step (see above). extra: JSON-able values kept in trainer_state.json."""
    from safetensors.torch import save_file
    rank, tmp = (dist.get_rank() if dist.is_initialized() else 0), path.rstrip("/") + ".tmp"
    full = full_state_dict(model)  # collective
    if rank == 0:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(os.path.join(tmp, "trainer_state"))
    barrier()
    save_file(trainer_tensors(model, optimizer), os.path.join(tmp, "trainer_state", f"rank{rank}.safetensors"),
              metadata={"step": str(step), "world_size": str(world_size)})
    barrier()
    if rank == 0:
        write_weights(model, processor, full, tmp, save_dtype)
        groups = [{k: v for k, v in g.items() if k != "params" and isinstance(v, (int, float, bool, str, list, tuple))}
                  for g in optimizer.param_groups]
        write_json(os.path.join(tmp, "trainer_state.json"), {"step": step, "world_size": world_size,
                                                               "param_groups": groups, **(extra or {})})
        swap_into_place(tmp, path)
    barrier()


def save_weights(model, processor, path, save_dtype, files):
    """The model alone, for inference (no trainer state: not a resume point), plus files: {name: JSON-able}."""
    rank, tmp = (dist.get_rank() if dist.is_initialized() else 0), path.rstrip("/") + ".tmp"
    full = full_state_dict(model)  # collective
    if rank == 0:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        write_weights(model, processor, full, tmp, save_dtype)
        for name, value in files.items():
            write_json(os.path.join(tmp, name), value)
        swap_into_place(tmp, path)
    barrier()


def full_state_dict(model):
    """The whole model's weights on CPU, gathered from every rank's shard (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def write_weights(model, processor, full, to, save_dtype):
    """The Hugging Face model directory: weights (full: a full state dict) in save_dtype, config, processor."""
    weights = {k: v.to(save_dtype) if v.is_floating_point() else v for k, v in full.items()}
    model.config.dtype = save_dtype  # what config.json says the weights are
    model.save_pretrained(to, state_dict=weights)
    processor.save_pretrained(to)


def swap_into_place(tmp, path):
    """Replace the directory path by tmp: path -> path.old, tmp -> path, remove path.old (recover_checkpoint
    finishes the job if a kill falls between)."""
    old = path.rstrip("/") + ".old"
    if os.path.exists(old):
        shutil.rmtree(old)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    if os.path.exists(old):
        shutil.rmtree(old)


def recover_checkpoint(path):
    """After a kill during swap_into_place: put the newest complete directory back at path (rank 0 only)."""
    tmp, old = path.rstrip("/") + ".tmp", path.rstrip("/") + ".old"
    if not os.path.exists(path):
        for candidate in (tmp, old):
            if os.path.exists(os.path.join(candidate, "trainer_state.json")):
                os.replace(candidate, path)
                break
    for leftover in (tmp, old):
        if os.path.exists(leftover):
            shutil.rmtree(leftover)


def barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def read_trainer_state(path):
    """{path}/trainer_state.json, or None when path holds no resumable checkpoint."""
    if is_rank0():
        recover_checkpoint(path)
    barrier()
    state_path = os.path.join(path, "trainer_state.json")
    return read_json(state_path) if os.path.exists(state_path) else None


def load_trainer_state(model, optimizer, path):
    """Restore this rank's master weights and optimizer state from a checkpoint; returns trainer_state.json.
    A checkpoint of another world size, a missing or torn shard, or one of another step is an error naming it."""
    from safetensors import safe_open
    state = read_json(os.path.join(path, "trainer_state.json"))
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if state["world_size"] != world:
        raise ValueError(f"{path}: saved by {state['world_size']} ranks, resumed by {world}: resume with the same world size")
    shard_path = os.path.join(path, "trainer_state", f"rank{rank}.safetensors")
    try:
        with safe_open(shard_path, framework="pt") as f:
            saved_step, tensors = f.metadata().get("step"), {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # missing, torn or not a safetensors file
        raise ValueError(f"{shard_path}: cannot read this rank's trainer state ({e})") from None
    if saved_step != str(state["step"]):
        raise ValueError(f"{shard_path}: holds step {saved_step} but {path}/trainer_state.json says {state['step']}")
    names = {id(p): n for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            _local(p).copy_(tensors[f"model/{n}"])
        for group, saved in zip(optimizer.param_groups, state["param_groups"]):
            group.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
            for p in group["params"]:
                for key in [k for k in tensors if k.startswith(f"optim/{names[id(p)]}/")]:
                    value = tensors[key].to(_local(p).device)
                    if hasattr(p, "device_mesh") and value.dim() > 0:  # an FSDP2 shard: rebuild the DTensor
                        from torch.distributed.tensor import DTensor
                        value = DTensor.from_local(value, p.device_mesh, p.placements, run_check=False)
                    optimizer.state[p][key.rsplit("/", 1)[1]] = value
    return state
