"""``engine.cuda_graphs=true``: the dense part of a training step replayed as CUDA graphs.

A DETR training step on a GPU is bound by the host at the paper's per-GPU batch (the GPU is
busy a quarter of the step; docs/benchmarks.md section 2), which is also why bf16 does not
pay there. A CUDA graph replays the kernels of a captured forward and backward with one
launch each. The step is split where the host must look at the data:

* the **dense part**: a function of tensors only (images, mask, region boxes, crops ->
  logits, boxes, decoder states, ...), with no host read and no host-to-device copy. It is
  captured with :func:`torch.cuda.make_graphed_callables` (forward and backward graphs, one
  autograd node) once per input signature: shapes, dtypes, autocast state;
* the **rest** runs eagerly: the Hungarian matching (the step's one host read), the losses,
  the optimiser. Siamese DETR and fine-tuning graph their losses too, as a second part with a
  pool of its own (``GraphableTask.losses_graph_name``). ``SiameseDETR.losses``: every image
  has ``M`` regions, so the shapes after the matching are fixed, and its dense part also
  computes the matching cost, so only the assignment is eager. ``DetectionTask.losses``: the
  targets and matched pairs are padded to a power of two.

Shapes: DETR's images change size every batch. ``engine.pad_to_multiple`` pads each batch's
height and width up to a multiple, so a few shapes recur (by default with graphs: 128 for
fine-tuning, whose images reach 1333 px; 64 for pretraining, whose views stay under about
600 px: docs/benchmarks.md has the shape counts and padding costs behind both); each
gets its own graph (its own memory pool, holding that shape's activations) on first sight, up
to ``engine.cuda_graphs_max`` graphs and while the GPU has twice the largest graph's memory
free; batches of other shapes run eagerly. Padding is what DETR's batching already does
(masked positions), so the losses keep their meaning.

Memory: by default (``engine.cuda_graphs_pool=shared``) all the graphs of one dense part
allocate from one memory pool. A graph's temporaries and the activations its forward saves
for its backward are dead once its backward has replayed, so the next shape's capture may
reuse them; what must survive between replays (static inputs, outputs, output gradients and
parameter gradients) stays allocated for the graph's life and is never handed out again. This
is safe because a dense part's forward and backward replay back to back within one step, with
no other graph of the same pool in between (one call per step, below), and each dense part has
its own pool. The graphs then hold about the largest shape's activations plus each graph's
small static buffers, instead of every shape's activations
(``engine.cuda_graphs_pool=per_graph``: one pool per graph, as before).

Where graphs are not used: on the CPU (the option is ignored, like ``engine.amp``), in eval
mode or without gradients (evaluation, ``predict``), for shapes past the cap, and for a shape
whose capture raised (warned once, then eager).

Constraints the callers keep: one call of a graph per step (a second call before the
backward would overwrite the saved activations), ``engine.accum_steps=1`` (the returned
parameter gradients live in the graph's buffers), autocast without its weight cache
(:func:`siamese_detr.engine.loop.autocast_context` turns it off).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from siamese_detr.engine.distributed import several_processes
from siamese_detr.engine.logging import get_logger

__all__ = ["Capture", "GraphableTask", "GraphedDense", "cuda_memory", "enable_cuda_graphs",
           "graph_signature"]

# capture(module, sample_args, pool) -> graphed callable; pool: a graph_pool_handle() the
# capture shares with the other graphs of the same dense part, or None for a pool of its own
Capture = Callable[[nn.Module, tuple[Tensor, ...], Any], Callable[..., Any]]


def graph_signature(args: tuple[Tensor | None, ...]) -> tuple[Any, ...]:
    """What a captured graph is specific to: each input's shape, dtype, device and
    ``requires_grad`` (``None`` inputs count too), and the autocast state."""
    parts: list[Any] = []
    for a in args:
        parts.append(None if a is None else (tuple(a.shape), a.dtype, a.device,
                                             a.requires_grad))
    for kind in ("cuda", "cpu"):
        on = torch.is_autocast_enabled(kind)
        parts.append((kind, on, torch.get_autocast_dtype(kind) if on else None))
    return tuple(parts)


def _reset_capture_state(device: torch.device) -> None:
    """After a capture that raised: its ``capture_end`` failed before the CUDA random
    generator left its capture state, so any later random op (dropout) raises "Offset increment
    outside graph capture". One small capture that ends well resets it."""
    try:
        graph = torch.cuda.CUDAGraph()
        # thread_local, as the captures: the loader's pin-memory thread may allocate meanwhile
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            torch.zeros(1, device=device).add_(1)
        del graph
    except Exception as e:  # noqa: BLE001 - the eager fallback goes on either way
        get_logger().warning("cuda_graphs: could not reset the capture state (%r)", e)


def _running_stats(module: nn.Module) -> list[Tensor]:
    """The running statistics a training step updates: those of the BatchNorm layers in
    training mode."""
    out: list[Tensor] = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            out += [b for b in (m.running_mean, m.running_var, m.num_batches_tracked)
                    if b is not None]
    return out


class _Bound(nn.Module):
    """``fn`` as a module whose parameters are ``owner``'s (what the graphs train)."""

    def __init__(self, owner: nn.Module, fn: Callable[..., tuple[Tensor, ...]]) -> None:
        super().__init__()
        self.owner = owner
        self.fn = fn

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        return self.fn(*args)


def _capture_cuda(module: nn.Module, args: tuple[Tensor, ...], pool: Any = None
                  ) -> Callable[..., Any]:
    options: dict[str, Any] = {"allow_unused_input": True}
    accepted = inspect.signature(torch.cuda.make_graphed_callables).parameters
    if pool is not None and "pool" in accepted:  # older torch: a pool per graph
        options["pool"] = pool
    if "capture_error_mode" in accepted:
        # thread_local: the DataLoader's pin-memory thread may allocate page-locked memory
        # while the training thread captures; only the capturing thread's calls are checked
        options["capture_error_mode"] = "thread_local"
    return torch.cuda.make_graphed_callables(module, args, **options)


def cuda_memory(device: torch.device) -> tuple[int, int]:
    """``(available, reserved)`` bytes on ``device``: what the driver has free plus what the
    caching allocator holds unused, and what the allocator holds in all."""
    free, _ = torch.cuda.mem_get_info(device)
    reserved = torch.cuda.memory_reserved(device)
    return free + reserved - torch.cuda.memory_allocated(device), reserved


MemoryProbe = Callable[[torch.device], tuple[int, int]]


class GraphedDense:
    """``fn(*tensors) -> tuple of tensors``, replayed from CUDA graphs where it can be.

    Args:
        owner: the module whose parameters ``fn`` uses and trains; graphs are used only while
            it is in training mode and gradients are enabled.
        fn: the dense part of a step (no host reads, no host-to-device copies; ``None`` inputs
            are passed through to it but not to the graph).
        max_graphs: at most this many captured signatures; others run eagerly.
        capture: ``capture(module, sample_args, pool) -> callable`` (default
            :func:`torch.cuda.make_graphed_callables`); tests pass a stand-in.
        shared_pool: every capture gets this dense part's one pool handle (see the module
            docstring); False: each capture gets ``None``, a pool of its own.
        memory: ``memory(device) -> (available, reserved)`` bytes (default
            :func:`cuda_memory` with real captures; none with a stand-in). A capture adds
            memory (with a pool per graph, its shape's activations; with the shared pool,
            mostly what exceeds the pool's free blocks), so a new shape is captured only while
            the memory available is at least ``headroom`` times the most a capture has added
            so far.
        name: for the log.

    ``stats()["graph_mib"]`` is the memory the captures added, summed (reserved bytes, the
    warm-up's eager allocations included; 0 without a memory probe).
    """

    def __init__(self, owner: nn.Module, fn: Callable[..., tuple[Tensor, ...]], *,
                 max_graphs: int = 16, capture: Capture | None = None,
                 memory: MemoryProbe | None = None, headroom: float = 2.0,
                 shared_pool: bool = True, name: str = "dense") -> None:
        self.owner = owner
        self.fn = fn
        self.max_graphs = max_graphs
        self.capture = capture or _capture_cuda
        self.memory = memory if memory is not None or capture is not None else cuda_memory
        self.headroom = headroom
        self.name = name
        self.graphs: dict[tuple[Any, ...], Callable[..., Any]] = {}
        self.failed: dict[tuple[Any, ...], str] = {}  # signatures whose capture raised
        self.graphed_calls = 0
        self.eager_calls = 0
        self.capture_seconds = 0.0
        self.capture_bytes: list[int] = []  # what each capture added (reserved bytes)
        # the shared pool's handle (an id: no device work, fine on the CPU); None: each
        # capture makes a pool of its own
        self.pool: Any = torch.cuda.graph_pool_handle() if shared_pool else None
        self._warned: set[str] = set()

    @property
    def graph_bytes(self) -> int:
        """The most memory one capture added (reserved bytes; 0 before any)."""
        return max(self.capture_bytes, default=0)

    @property
    def capture_mib(self) -> list[float]:
        """What each capture added, in order (MiB)."""
        return [b / 2**20 for b in self.capture_bytes]

    def usable(self, args: tuple[Tensor | None, ...]) -> bool:
        first = next(a for a in args if a is not None)
        return (self.owner.training and torch.is_grad_enabled()
                and (first.device.type == "cuda" or self.capture is not _capture_cuda))

    def _warn_once(self, why: str, msg: str, *fmt: object) -> None:
        if why not in self._warned:
            self._warned.add(why)
            get_logger().warning(msg, *fmt)

    def _room_for_another(self, device: torch.device) -> bool:
        if self.memory is None or not self.graphs:
            return True
        available, _ = self.memory(device)
        if available >= self.headroom * self.graph_bytes:
            return True
        self._warn_once("memory", "cuda_graphs: %s keeps %d graphs; %.0f MiB left is under "
                        "%.1fx the %.0f MiB a graph took, so batches of new shapes run eagerly "
                        "(raise engine.pad_to_multiple for fewer shapes)", self.name,
                        len(self.graphs), available / 2**20, self.headroom,
                        self.graph_bytes / 2**20)
        return False

    def _capture(self, key: tuple[Any, ...], tensors: tuple[Tensor, ...],
                 dense: Callable[..., tuple[Tensor, ...]]) -> Callable[..., Any] | None:
        """Capture one signature; None (and the signature remembered as failed) when the
        capture raises."""
        device = tensors[0].device
        before = self.memory(device)[1] if self.memory is not None else 0
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        # inputs with a gradient (the outputs of another graphed part) are sampled as leaves
        # of their own: the capture keeps its sample inputs as its static inputs, which must
        # be neither another graph's output buffers nor tied to this step's autograd graph
        samples = tuple(t.detach().clone().requires_grad_() if t.requires_grad else t
                        for t in tensors)
        # the capture's eager warm-up runs are not training steps: what they do to the
        # BatchNorm running statistics is undone
        stats = _running_stats(self.owner)
        saved = [b.clone() for b in stats]
        t0 = time.perf_counter()
        try:
            graphed = self.capture(_Bound(self.owner, dense), samples,  # type: ignore[arg-type]
                                   self.pool)
        except Exception as e:  # an op that cannot be captured, or out of memory
            if stream is not None:  # a failed capture_end leaves its side stream current
                torch.cuda.set_stream(stream)
                torch.cuda.synchronize(device)
                _reset_capture_state(device)
            self.failed[key] = repr(e)
            get_logger().warning("cuda_graphs: %s could not be captured for %s (%r); batches "
                                 "of this shape run eagerly", self.name,
                                 tuple(tensors[0].shape), e)
            return None
        finally:
            self.capture_seconds += time.perf_counter() - t0
            with torch.no_grad():
                for b, v in zip(stats, saved):
                    b.copy_(v)
        added = 0
        if self.memory is not None:
            added = max(0, self.memory(device)[1] - before)
            self.capture_bytes.append(added)
        self.graphs[key] = graphed
        get_logger().info("cuda_graphs: captured %s #%d for %s in %.1f s (+%.0f MiB)",
                          self.name, len(self.graphs), tuple(tensors[0].shape),
                          time.perf_counter() - t0, added / 2**20)
        return graphed

    def __call__(self, *args: Tensor | None) -> tuple[Tensor, ...]:
        if not self.usable(args):
            return self.fn(*args)
        present = [i for i, a in enumerate(args) if a is not None]
        tensors = tuple(args[i] for i in present)
        key = graph_signature(args)
        graphed = self.graphs.get(key)
        if graphed is None and key not in self.failed:
            if len(self.graphs) >= self.max_graphs:
                self._warn_once("cap", "cuda_graphs: %s has %d graphs (engine.cuda_graphs_max); "
                                "batches of new shapes run eagerly (raise "
                                "engine.pad_to_multiple or engine.cuda_graphs_max)", self.name,
                                self.max_graphs)
            elif self._room_for_another(tensors[0].device):  # type: ignore[union-attr]
                dense = self._tensors_only(len(args), present)
                graphed = self._capture(key, tensors, dense)  # type: ignore[arg-type]
        if graphed is None:
            self.eager_calls += 1
            return self.fn(*args)
        self.graphed_calls += 1
        return tuple(graphed(*tensors))

    def _tensors_only(self, n: int, present: list[int]) -> Callable[..., tuple[Tensor, ...]]:
        """``fn`` of the ``present`` arguments only (a graph takes tensors, not ``None``)."""
        def dense(*xs: Tensor) -> tuple[Tensor, ...]:
            full: list[Tensor | None] = [None] * n
            for i, t in zip(present, xs):
                full[i] = t
            return tuple(self.fn(*full))
        return dense

    def stats(self) -> dict[str, float]:
        return {"graphs": len(self.graphs), "graphed_calls": self.graphed_calls,
                "eager_calls": self.eager_calls, "capture_seconds": self.capture_seconds,
                "failed_captures": len(self.failed),
                "graph_mib": sum(self.capture_bytes) / 2**20}


class GraphableTask:
    """Mixin of a task whose step has a dense part (``dense(*tensors) -> tuple``; see the
    module docstring): ``enable_cuda_graphs`` and the padding it implies. The task's forward
    pads its images with ``pad_to_multiple(images, self.pad_multiple)`` and calls
    :meth:`run_dense`.

    A task whose losses after the matching have fixed shapes (``losses(*tensors) -> (total,
    raw)``) names them in :attr:`losses_graph_name`: they get graphs of their own, in a pool of
    their own, which :meth:`run_losses` replays (one process only: under DDP the losses hold
    collectives, SyncBatchNorm and the box count, and run eagerly)."""

    pad_multiple: int = 1  # engine.pad_to_multiple (1: no extra padding)
    default_pad_multiple: int = 64  # with graphs and engine.pad_to_multiple=0
    _dense: GraphedDense | None = None
    _losses: GraphedDense | None = None
    graph_name: str = "dense"  # for the log
    losses_graph_name: str | None = None  # a second graphed part, the losses (for the log)

    dense: Callable[..., tuple[Tensor, ...]]
    losses: Callable[..., tuple[Tensor, Tensor]]

    def graph_owner(self) -> nn.Module:
        """The module whose parameters the dense part uses and trains (default: the task)."""
        assert isinstance(self, nn.Module)
        return self

    def losses_owner(self) -> nn.Module:
        """The module whose parameters :meth:`losses` uses and trains (default: the task)."""
        assert isinstance(self, nn.Module)
        return self

    def enable_cuda_graphs(self, max_graphs: int, pad_multiple: int,
                           capture: Capture | None = None, shared_pool: bool = True,
                           losses: bool = True) -> None:
        """Pad batches to ``pad_multiple`` (0: :attr:`default_pad_multiple`) and run
        :meth:`dense` (forward and backward) from CUDA graphs, all from one memory pool
        unless ``shared_pool`` is False, and :meth:`losses` likewise where the task has them
        (:attr:`losses_graph_name`) unless ``losses`` is False (the benches' A/B); the rest
        of the step stays eager."""
        self.pad_multiple = pad_multiple or self.default_pad_multiple
        self._dense = GraphedDense(self.graph_owner(), self.dense, max_graphs=max_graphs,
                                   capture=capture, shared_pool=shared_pool,
                                   name=self.graph_name)
        self._losses = None
        if losses and self.losses_graph_name is not None:
            self._losses = GraphedDense(self.losses_owner(), self.losses, max_graphs=max_graphs,
                                        capture=capture, shared_pool=shared_pool,
                                        name=self.losses_graph_name)

    def run_dense(self, *args: Tensor | None) -> tuple[Tensor, ...]:
        """:meth:`dense`, from its graphs when they are enabled."""
        return (self._dense or self.dense)(*args)

    def losses_graphed(self) -> bool:
        """Do :meth:`run_losses` calls go to the losses' graphs (enabled, one process)?"""
        return self._losses is not None and not several_processes()

    def run_losses(self, *args: Tensor | None) -> tuple[Tensor, Tensor]:
        """:meth:`losses`, from their graphs when :meth:`losses_graphed`."""
        if self.losses_graphed():
            assert self._losses is not None
            total, raw = self._losses(*args)
            return total, raw
        return self.losses(*args)


def enable_cuda_graphs(task: nn.Module, max_graphs: int, pad_multiple: int,
                       capture: Capture | None = None, shared_pool: bool = True) -> list[str]:
    """Give every module in ``task`` that has a dense part (``enable_cuda_graphs`` method)
    its graphs, each dense part its own pool; return their names (empty: nothing to
    graph)."""
    done = []
    for name, module in task.named_modules():
        if isinstance(module, GraphableTask):
            module.enable_cuda_graphs(max_graphs, pad_multiple, capture, shared_pool)
            done.append(name or type(module).__name__)
    return done
