"""Count what a piece of code asks of the device: aten ops dispatched and host reads (syncs).

A host read is any place where Python needs a tensor's values: ``item()``, ``bool(t)``,
``int(t)``/``float(t)`` (all reach ``aten::_local_scalar_dense``), ``tolist()``, ``numpy()``,
``cpu()`` and ``to("cpu")``, and the ops whose output size depends on the values, which read
that size back on a GPU (``nonzero``, ``masked_select``, ``unique``, ``repeat_interleave``
without ``output_size``, indexing with a boolean mask, ``equal``). On a GPU each one waits
for the device to drain its queue, so a training step should have at most one. On the CPU
they cost nothing, but counting them here tells what the same code would do on a GPU, which is
what the tests and ``bench/`` use.

Two rules keep a CPU count equal to what a GPU run would pay:

* ``to(...)`` counts only when the target is written as the string ``"cpu"``: a
  ``to(device)`` with a ``torch.device`` is how code moves data to the training device (a
  no-op or a device-to-device copy on a GPU, even though the device is the host in a CPU run);
* reading a host copy costs nothing: ``numpy()``/``tolist()``/``item()`` of the result of a
  counted ``cpu()``/``to("cpu")`` (or of a view of it) is not counted again.

    with OpCounter() as c:
        step()
    print(c.ops, c.syncs, c.sync_sites)
"""

from __future__ import annotations

import traceback
import weakref
from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_HOST_READ_METHODS = {"tolist", "numpy", "cpu"}
# calls that make a tensor from host data: on a GPU each is a host-to-device copy, which a
# CUDA graph cannot replay (it would copy from a host buffer that is gone)
_UPLOAD_FUNCTIONS = {"tensor", "as_tensor", "from_numpy", "pin_memory"}
# aten ops that read values back on a GPU: the size of their output depends on the data (or,
# for ``equal``, their result is a host bool); not seen through ``_local_scalar_dense``
_DATA_DEPENDENT = {"nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
                   "unique_consecutive", "equal"}


def _reads_back(func: Any, args: tuple, kwargs: dict) -> bool:
    """Does this aten op read device values back to the host on a GPU?"""
    name = func.overloadpacket.__name__
    if name in _DATA_DEPENDENT:
        return True
    if name == "repeat_interleave":  # repeats as a tensor: the output size is their sum
        tensor_repeats = len(args) == 1 or isinstance(args[1], torch.Tensor)
        return tensor_repeats and kwargs.get("output_size") is None
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
    return False


def _is_host_target(args: tuple, kwargs: dict) -> bool:
    """Does a ``Tensor.to(...)`` call move to the CPU?"""
    for a in (*args[1:], kwargs.get("device")):
        if isinstance(a, str) and torch.device(a).type == "cpu":
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
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and not self.owner._is_host(
                args[0]):
            self.owner._sync("item")
        elif _reads_back(func, args, kwargs) and not all(
                self.owner._is_host(a) for a in args if isinstance(a, torch.Tensor)):
            self.owner._sync(str(func.overloadpacket.__name__))
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, owner: OpCounter) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        to_host = name == "cpu" or (name == "to" and _is_host_target(args, kwargs))
        if to_host or (name in _HOST_READ_METHODS and not self.owner._is_host(args[0])):
            self.owner._sync(name)
        if name in _UPLOAD_FUNCTIONS:
            self.owner._upload(name)
        out = func(*args, **kwargs)
        if to_host and isinstance(out, torch.Tensor):
            self.owner._host[id(out)] = weakref.ref(out)
        return out


class OpCounter:
    """Context manager counting aten ops (``ops``, ``op_names``), host reads (``syncs``,
    ``sync_sites``: ``kind@file:line`` for each read, innermost frame in this package) and
    tensors made from host data (``uploads``, ``upload_sites``: ``torch.tensor``,
    ``as_tensor``, ``from_numpy``, ``pin_memory``)."""

    def __init__(self) -> None:
        self.ops = 0
        self.syncs = 0
        self.op_names: Counter[str] = Counter()
        self.sync_sites: Counter[str] = Counter()
        self.uploads = 0
        self.upload_sites: Counter[str] = Counter()
        self._host: dict[int, weakref.ref] = {}  # host copies made inside the region
        self._modes = (_Function(self), _Dispatch(self))

    def _sync(self, kind: str) -> None:
        self.syncs += 1
        self.sync_sites[f"{kind}@{_caller()}"] += 1

    def _upload(self, kind: str) -> None:
        self.uploads += 1
        self.upload_sites[f"{kind}@{_caller()}"] += 1

    def _is_host(self, t: object) -> bool:
        """Is ``t`` (or the tensor it views) a host copy made by a counted read?"""
        if not isinstance(t, torch.Tensor):
            return False
        for x in (t, t._base):
            ref = self._host.get(id(x)) if x is not None else None
            if ref is not None and ref() is x:
                return True
        return False

    def __enter__(self) -> OpCounter:
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)
