"""Count what a piece of code asks of the device: aten ops dispatched and host reads (syncs).

A host read is any place where Python needs a tensor's values: ``item()``, ``bool(t)``,
``int(t)``/``float(t)`` (all reach ``aten::_local_scalar_dense``), ``tolist()``, ``numpy()``,
``cpu()`` and ``to("cpu")``. On a GPU each one waits for the device to drain its queue, so a
training step should have at most one. On the CPU they cost nothing, but counting them here
tells what the same code would do on a GPU, which is what the tests and ``bench/`` use.

    with OpCounter() as c:
        step()
    print(c.ops, c.syncs, c.sync_sites)
"""

from __future__ import annotations

import traceback
from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_HOST_READ_METHODS = {"tolist", "numpy", "cpu"}


def _is_host_target(args: tuple, kwargs: dict) -> bool:
    """Does a ``Tensor.to(...)`` call move to the CPU?"""
    for a in (*args[1:], kwargs.get("device")):
        if isinstance(a, str | torch.device) and torch.device(a).type == "cpu":
            return True
    return False


def _caller(skip_prefix: str = "siamese_detr") -> str:
    """The innermost frame in our package (else the innermost frame) as ``file:line``."""
    frames = traceback.extract_stack()[:-3]
    for fr in reversed(frames):
        if skip_prefix in fr.filename and "profiling.py" not in fr.filename:
            return f"{fr.filename.rsplit('siamese_detr/', 1)[-1]}:{fr.lineno}"
    fr = frames[-1]
    return f"{fr.filename}:{fr.lineno}"


class _Dispatch(TorchDispatchMode):
    def __init__(self, owner: OpCounter) -> None:
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        self.owner.ops += 1
        self.owner.op_names[str(func.overloadpacket.__name__)] += 1
        if func is torch.ops.aten._local_scalar_dense.default:
            self.owner._sync("item")
        return func(*args, **(kwargs or {}))


class _Function(TorchFunctionMode):
    def __init__(self, owner: OpCounter) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _HOST_READ_METHODS or (name == "to" and _is_host_target(args, kwargs)):
            self.owner._sync(name)
        return func(*args, **kwargs)


class OpCounter:
    """Context manager counting aten ops (``ops``, ``op_names``) and host reads (``syncs``,
    ``sync_sites``: ``kind@file:line`` for each read, innermost frame in this package)."""

    def __init__(self) -> None:
        self.ops = 0
        self.syncs = 0
        self.op_names: Counter[str] = Counter()
        self.sync_sites: Counter[str] = Counter()
        self._modes = (_Function(self), _Dispatch(self))

    def _sync(self, kind: str) -> None:
        self.syncs += 1
        self.sync_sites[f"{kind}@{_caller()}"] += 1

    def __enter__(self) -> OpCounter:
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)
