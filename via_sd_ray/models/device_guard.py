"""A guard that sees, on any device (the CPU included), what a tier call would cost on a GPU.

On a CPU a forward pass's logits are already host memory, so reading one number of them back is
free and a tensor built without ``device=`` lands in the right place by luck: both are GPU bugs a
CPU run never shows. ``HostTransfers`` makes them visible. It tags the stack's weights and KV pool
as device tensors, propagates the tag to every tensor computed from them, and counts each read of
a tagged tensor back to the host (``.cpu()``, ``.tolist()``, ``.item()``, ``int()`` / ``float()`` /
``bool()``, ``.numpy()``, and ``.to("cpu")`` in via-sd-ray's code). It also records every tensor factory call made by
via-sd-ray's own code without a ``device`` (``torch.tensor``, ``torch.arange``, ``torch.zeros``, ...).

The tier tests run calls under it and require one transfer per call and no device-less factory;
``via-sd gpu-check`` runs it on the GPU too.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

_TAG = "_via_device_tensor"
_READS = {torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.numpy, torch.Tensor.__bool__,
          torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__}
_FACTORIES = {torch.tensor, torch.as_tensor, torch.arange, torch.zeros, torch.ones, torch.empty, torch.full,
              torch.rand, torch.randn, torch.randint, torch.eye, torch.linspace}
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # via_sd_ray/
_HERE = os.path.abspath(__file__)


@dataclass
class HostTransfers(TorchFunctionMode):
    """Counts device -> host reads of tensors derived from ``roots`` (module parameters/buffers or tensors)
    and device-less tensor factories called from via-sd-ray's code, while active (``with``)."""

    roots: list = field(default_factory=list)
    transfers: list[str] = field(default_factory=list)  # the read functions, in order
    deviceless: list[str] = field(default_factory=list)  # "file:line function" of each device-less factory

    def __post_init__(self):
        super().__init__()
        for root in self.roots:
            tensors = list(root.parameters()) + list(root.buffers()) if isinstance(root, torch.nn.Module) else [root]
            for tensor in tensors:
                setattr(tensor, _TAG, True)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FACTORIES and kwargs.get("device") is None:
            caller = _our_caller()
            if caller is not None:
                self.deviceless.append(caller)
        inputs = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        tagged = any(getattr(x, _TAG, False) for x in inputs)
        out = func(*args, **kwargs)
        # .to(the host) read as a transfer only from via-sd-ray's code: transformers' .to(x.device) goes to the
        # device wherever the model runs (the host, in a CPU run)
        to_host = func in _READS or (func is torch.Tensor.to and _to_cpu(args, kwargs) and _our_caller() is not None)
        if tagged and to_host:
            self.transfers.append(getattr(func, "__name__", str(func)))
        for x in tree_flatten(out)[0]:
            if isinstance(x, torch.Tensor):
                try:
                    setattr(x, _TAG, tagged and not to_host)
                except (AttributeError, RuntimeError):  # a tensor that takes no attributes
                    pass
        return out


def _to_cpu(args, kwargs) -> bool:
    targets = list(args[1:]) + [kwargs.get("device")]
    return any((isinstance(t, str) and t.startswith("cpu")) or (isinstance(t, torch.device) and t.type == "cpu")
               for t in targets)


def _our_caller() -> str | None:
    """The innermost frame in via-sd-ray's code (not this file), as ``file:line function``; None if the
    call came from elsewhere (torch, transformers)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if name != _HERE and not name.startswith(os.path.dirname(torch.__file__)):
            if name.startswith(_PACKAGE):
                return f"{os.path.relpath(name, os.path.dirname(_PACKAGE))}:{frame.f_lineno} {frame.f_code.co_name}"
            return None
        frame = frame.f_back
    return None
