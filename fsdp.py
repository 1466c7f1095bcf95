"""Sharded data parallel (``TRAIN.FSDP``, ``--fsdp``): PyTorch's FSDP2 (``fully_shard``) over the window blocks.

Parameters, gradients and optimizer states are split across the processes of a ``torchrun`` job: each process
keeps 1/N of every tensor (a ``DTensor`` sharded on dim 0) and gathers a block's full weights just for its forward
and backward. What changes against DDP, and where:

- sharding (:func:`prepare_sharded`): every window block, every stage's patch merging, then the root (patch
  embedding, norms, head); rank 0's initial weights are broadcast first, as DDP does, so all processes train
  the same initialisation; with ``TRAIN.COMPILE`` each block is compiled in place (parameter names unchanged);
- precision (:func:`mixed_precision_policy`): autocast bf16/fp16 becomes bf16/fp16 gathered parameters with
  float32 gradient reduction; float16 keeps ``torch.amp.GradScaler``, whose non-finite check on ``DTensor``
  gradients is agreed across the processes by the ``DTensor`` dispatcher, so all of them skip the same steps;
- accumulation (:func:`gradient_sync_off`): no reduce-scatter on the accumulating micro-steps;
- clipping (:func:`clip_grad_norm`): the global norm over all shards (one small all-reduce on the device);
- EMA: a second sharded copy of the model, updated shard by shard (no communication); it costs one more
  1/N of the float32 weights per process;
- checkpoints (``checkpoint.save_sharded_training_checkpoint``): every process writes its shards through
  ``torch.distributed.checkpoint`` (DCP).

One process has nothing to shard: ``--fsdp`` then trains the plain model and still writes sharded checkpoints.
"""
import contextlib
import copy
import logging
import weakref
from typing import Dict, Iterable, Iterator, List

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from utils import get_world_size

logger = logging.getLogger(__name__)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is an FSDP2-sharded module (its parameters are ``DTensor`` shards)."""
    return isinstance(model, FSDPModule)


def mixed_precision_policy(config) -> MixedPrecisionPolicy:
    """The precision settings as FSDP's policy: low-precision gathered parameters, float32 gradient reduction.

    The sharded parameters and the optimizer stay float32; autocast still runs (norms and softmax in float32).
    """
    if not config.AMP_ENABLE:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=getattr(torch, config.AMP_DTYPE), reduce_dtype=torch.float32)


def shard_units(model: nn.Module) -> List[nn.Module]:
    """The modules sharded on their own, in forward order: every window block and every stage's patch merging.

    Found by type, so every family built on the shared trunk (V1, V2, MLP) and models wrapping one are covered.
    """
    from models.swin_transformer import BasicLayer, WindowBlock

    units = []
    for module in model.modules():
        if isinstance(module, WindowBlock):
            units.append(module)
        elif isinstance(module, BasicLayer) and module.downsample is not None:
            units.append(module.downsample)
    return units


@torch.no_grad()
def broadcast_from_rank0(model: nn.Module, device: torch.device) -> None:
    """Gives every process rank 0's parameters and persistent buffers, one tensor at a time (bounded memory).

    Each process initialised its own weights from its own seed; DDP broadcasts rank 0's, and so does this.
    """
    persistent = [b for name, b in model.named_buffers() if name.rsplit(".", 1)[-1] not in
                  _non_persistent_names(model)]
    for tensor in list(model.parameters()) + persistent:
        on_device = tensor.detach().to(device)
        dist.broadcast(on_device, src=0)
        tensor.copy_(on_device)


def _non_persistent_names(model: nn.Module) -> set:
    names = set()
    for module in model.modules():
        names.update(module._non_persistent_buffers_set)
    return names


def shard(model: nn.Module, config, device: torch.device, compile_blocks: bool = False) -> nn.Module:
    """Shards ``model`` in place over all processes: each unit of :func:`shard_units`, then the root.

    The parameters end on ``device``; the model's class and parameter names stay (a ``DTensor`` per parameter).
    """
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (get_world_size(),))
    policy = mixed_precision_policy(config)
    for unit in shard_units(model):
        if compile_blocks:
            unit.compile()  # in place: the module and its parameter names stay
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def prepare_sharded(config, model: nn.Module, device: torch.device):
    """The sharded counterpart of ``main.prepare_model``: ``(model, model_ema, train_model)``.

    ``model`` and ``train_model`` are the same sharded module. The EMA (``MODEL.EMA.ENABLE``) is a timm
    ``ModelEmaV3`` whose module is a second sharded copy, made from the broadcast weights.
    """
    from timm.utils import ModelEmaV3

    broadcast_from_rank0(model, device)
    model_ema = ModelEmaV3(model, decay=config.MODEL.EMA.DECAY) if config.MODEL.EMA.ENABLE else None
    unsharded = copy.deepcopy(model).cpu()  # for evaluation: see evaluation_model
    shard(model, config, device, compile_blocks=config.TRAIN.COMPILE)
    _UNSHARDED_COPIES[model] = unsharded
    if model_ema is not None:
        shard(model_ema.module, config, device)
        _UNSHARDED_COPIES[model_ema.module] = unsharded  # evaluated one after the other, so one copy serves both
    params = sum(p.numel() for p in model.parameters())
    local = sum(p.to_local().numel() for p in model.parameters() if isinstance(p, DTensor))
    logger.info("FSDP: %d blocks and merges sharded over %d processes; %.2fM of %.2fM parameters held here; "
                "precision: %s", len(shard_units(model)), get_world_size(), local / 1e6, params / 1e6,
                mixed_precision_policy(config))
    return model, model_ema, model


# The unsharded copy that evaluates each sharded model (see evaluation_model), kept on the CPU between evaluations.
_UNSHARDED_COPIES: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def evaluation_model(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """The module to evaluate ``model`` with: ``model`` itself, or for a sharded model an unsharded copy holding its
    float32 weights (collective: call it on every process).

    A sharded model gathers each block's weights from every process in its forward, one collective per block, so
    evaluating it would need the same number of forwards on every process, which exact evaluation does not give
    (a shard may hold one image more, or a batch of unreadable images on one process leaves nothing to forward);
    and it gathers them in the training precision (bfloat16) even for a float32 evaluation. The copy needs no
    collective per batch and evaluates exactly as the unsharded model does. Entering gathers each weight once, in
    the same order on every process; on leaving the copy goes back to the CPU, so training keeps FSDP's memory
    saving.
    """
    if not is_sharded(model):
        yield model
        return
    unsharded = _UNSHARDED_COPIES[model]
    unsharded.to(device)
    with torch.no_grad():
        targets = unsharded.state_dict()
        for name, value in model.state_dict().items():
            targets[name].copy_(value.full_tensor() if isinstance(value, DTensor) else value)
    try:
        yield unsharded
    finally:
        unsharded.to("cpu")


@contextlib.contextmanager
def gradient_sync_off(model: FSDPModule) -> Iterator[None]:
    """No gradient reduce-scatter while inside: the micro-step's gradients accumulate unsharded in each process."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` that also takes sharded (``DTensor``) gradients.

    Each process's norm covers only its shards; the total is completed by one all-reduce on the device (no
    host sync) and every shard is scaled by the same factor.

    Returns:
        The total norm before clipping, a plain 0-d tensor.
    """
    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return total


def load_full_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> None:
    """Loads full tensors (a ``.pth`` file's) into a sharded model: each process keeps its own shards.

    Raises:
        ValueError: a key is missing or unexpected, or a shape differs.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise ValueError(f"the weights do not fit this model: missing {missing[:8]}, unexpected {unexpected[:8]}, "
                         f"shape mismatches {mismatched[:8]}")
    set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True))
