"""Snapshots: the tensors of a save point taken out of the live model and optimizer,
the only part of a save that may hold training up.

Asynchronous saves copy tensors into host buffers allocated once and reused
(:class:`HostBuffers`); the files are written from those copies in the background.
``SavePoints(snapshot=...)`` decides when the copies are made:

* ``"eager"``: every tensor is copied before ``save()`` returns. Any code may change
  the model afterwards.
* ``"deferred"``: the tensors a hooked optimizer owns (its parameters and its state)
  are copied in the background while the next forward and backward run: they do not
  change until that optimizer's ``step()``, and a step pre-hook
  (``Optimizer.register_step_pre_hook``) makes the step wait for their copy first.
  Everything else (buffers, parameters no passed optimizer owns, other objects' state)
  is still copied before ``save()`` returns. The contract: between ``save()`` and the
  next ``step()`` of that optimizer, nothing else changes those tensors in place. A
  change is detected through autograd's version counters, checked when a tensor's copy
  ends and again at the step, and fails the save loudly
  (:class:`~savepoints.errors.SnapshotChangedError`), naming the tensor; nothing
  half-right is committed.

Both modes are *incremental*: a frozen parameter (``requires_grad=False``, owned by no
passed optimizer) that is the same storage at the same version as at the previous
snapshot is neither copied nor hashed, and a weights file holding only such tensors is
the previous file's stored blob, linked instead of written. Version counters miss edits
made through ``.data`` or by extensions writing memory directly; asynchronous saves
therefore compare a sample of each reused tensor's elements with its copy in the
background, and a difference fails the save and makes the next one copy it again.

On a GPU the host buffers are pinned and the copies run on a dedicated CUDA stream,
ordered after the work queued before ``save()`` by an event; the optimizer step waits
on the GPU (``wait_event``), not on the CPU.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from savepoints.errors import SnapshotChangedError
from savepoints.manifest import FileEntry

log = logging.getLogger("savepoints")

SnapshotMode = Literal["eager", "deferred"]
SNAPSHOT_MODES: tuple[str, ...] = ("eager", "deferred")

#: Elements of a reused tensor compared with its copy (spread over the whole tensor).
_SAMPLE = 64


class HostBuffers:
    """Host memory for snapshots, allocated on first use and reused by every later save
    of the same shapes (pinned when the source is on a GPU, for fast device-to-host
    copies). Reuse matters: copying into fresh memory runs at a fraction of the speed of
    copying into memory already mapped."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._devices: set[torch.device] = set()

    def get(self, key: str) -> torch.Tensor:
        return self._buffers[key]

    def holds(self, key: str, tensor: torch.Tensor) -> bool:
        buf = self._buffers.get(key)
        return buf is not None and buf.shape == tensor.shape and buf.dtype == tensor.dtype

    def copy(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """Copy ``tensor`` into the buffer of ``key`` (asynchronously from a GPU, on the
        current stream: :meth:`synchronize` or an event before reading it)."""
        t = tensor.detach()
        if not self.holds(key, t):
            pin = t.is_cuda and torch.cuda.is_available()
            self._buffers[key] = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
        buf = self._buffers[key]
        buf.copy_(t, non_blocking=t.is_cuda)
        if t.is_cuda:
            self._devices.add(t.device)
        return buf

    @property
    def devices(self) -> set[torch.device]:
        return set(self._devices)

    @property
    def on_device(self) -> bool:
        """Whether copies from a GPU were made (they may still be in flight)."""
        return bool(self._devices)

    def synchronize(self) -> None:
        """Wait for device-to-host copies still in flight, on every GPU copied from."""
        for device in self._devices:
            torch.cuda.synchronize(device)

    def clear(self) -> None:
        """Give the memory back (the next save allocates again)."""
        self._buffers.clear()
        self._devices.clear()

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


def torch_optimizer(obj: Any) -> torch.optim.Optimizer | None:
    """The ``torch.optim.Optimizer`` inside ``obj`` (accelerate's ``AcceleratedOptimizer``
    and similar wrappers keep it as ``.optimizer``), or None."""
    for _ in range(8):
        inner = getattr(obj, "optimizer", None)
        if inner is not None and inner is not obj:
            obj = inner  # accelerate's wrapper is an Optimizer subclass without hooks of its own
        elif isinstance(obj, torch.optim.Optimizer):
            return obj
        else:
            return None
    return None


def display_name(key: str) -> str:
    """``"model.safetensors\\0h.0.attn.weight"`` -> ``"h.0.attn.weight" (model.safetensors)``."""
    rel, _, name = key.partition("\0")
    return f"{name} ({rel})" if name else rel


@dataclass(eq=False)
class _Held:
    """What a host buffer (or the last written file) holds of one frozen tensor."""

    source: torch.Tensor  # kept alive: its memory cannot become another tensor's
    version: int
    generation: int
    buffered: bool  # whether the host buffer holds the copy (asynchronous saves)
    #: A spread sample of its elements when it was written (synchronous saves, which
    #: have no host copy to compare with).
    sample: torch.Tensor | None = None


class _Item:
    __slots__ = ("key", "optimizer", "sample", "source", "version")

    def __init__(self, key: str, source: torch.Tensor, optimizer: int | None = None) -> None:
        self.key = key
        self.source = source
        self.version = source._version
        self.optimizer = optimizer
        self.sample: torch.Tensor | None = None

    @property
    def changed(self) -> bool:
        """Whether the tensor was changed in place since it was taken."""
        return bool(self.source._version != self.version)


class Snapshotter:
    """Snapshots of one run's saves: host buffers, what they hold, optimizer hooks."""

    def __init__(self, mode: SnapshotMode) -> None:
        self.mode = mode
        self.buffers = HostBuffers()
        self._held: dict[str, _Held] = {}
        self._files: dict[str, tuple[tuple[tuple[str, int], ...], FileEntry]] = {}
        self._generations = itertools.count(1)
        self._hooks: dict[int, Any] = {}
        self._current: Snapshot | None = None
        self._late: list[SnapshotChangedError] = []
        self._stream: Any = None
        self._lock = threading.Lock()

    def begin(self, step: int, *, buffered: bool) -> Snapshot:
        """A snapshot for the save of ``step``: ``buffered`` for asynchronous saves."""
        snap = Snapshot(self, step, buffered=buffered,
                        deferred=buffered and self.mode == "deferred")  # fmt: skip
        self._current = snap
        return snap

    def late_failures(self) -> list[SnapshotChangedError]:
        """Violations found at an optimizer step after their save was committed."""
        with self._lock:
            found, self._late = self._late, []
        return found

    def close(self) -> None:
        """Remove the optimizer hooks and let go of the tensors held for reuse."""
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        self._held.clear()
        self._files.clear()
        self.buffers.clear()
        self._current = None

    # ------------------------------------------------------------------ internals

    def hook(self, optimizer: torch.optim.Optimizer) -> None:
        if id(optimizer) in self._hooks:
            return
        me = weakref.ref(self)

        def before_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            owner = me()
            if owner is not None and owner._current is not None:
                owner._current.before_step(opt)

        self._hooks[id(optimizer)] = optimizer.register_step_pre_hook(before_step)
        # A dead optimizer's hook goes with it; forget its handle then.
        weakref.finalize(optimizer, self._hooks.pop, id(optimizer), None)

    def copy_stream(self, device: torch.device) -> Any:
        if self._stream is None or self._stream.device != device:
            self._stream = torch.cuda.Stream(device=device)
        return self._stream

    def reusable_file(self, rel: str, keys: Iterable[str]) -> FileEntry | None:
        """The entry of ``rel`` as last written, when it holds exactly ``keys`` and each is
        still what the held copy was then (so its bytes would be the same)."""
        found = self._files.get(rel)
        if found is None:
            return None
        ids, entry = found
        now = []
        for key in sorted(keys):
            held = self._held.get(key)
            if held is None:
                return None
            now.append((key, held.generation))
        return entry if tuple(now) == ids else None

    def wrote(self, rel: str, keys: Iterable[str], entry: FileEntry) -> None:
        ids = []
        for key in sorted(keys):
            held = self._held.get(key)
            if held is None:
                self._files.pop(rel, None)
                return
            ids.append((key, held.generation))
        self._files[rel] = (tuple(ids), entry)

    def forget(self, key: str) -> None:
        """The held copy of ``key`` is not what the tensor holds: copy it next time."""
        self._held.pop(key, None)


class Snapshot:
    """The tensors of one save: which are copied now, later, or reused."""

    def __init__(self, owner: Snapshotter, step: int, *, buffered: bool, deferred: bool) -> None:
        self.owner = owner
        self.step = step
        self.buffered = buffered
        self.deferred = deferred
        self._owned: dict[int, int] = {}  # data_ptr -> id(optimizer)
        self._deferrable: set[int] = set()  # ids of the optimizers hooked for this save
        self._device: torch.device | None = None  # the GPU of the deferred copies
        self._frozen: set[int] = set()
        #: Tensors copied in the background (deferred): what hooked optimizers own.
        self.items: list[_Item] = []
        #: Frozen tensors taken unchanged from the previous snapshot (no copy).
        self.reused: list[_Item] = []
        self._copied = threading.Event()
        self._copy_event: Any = None
        self._ready_event: Any = None
        self._eager_event: Any = None
        self._sampled_on_device = False
        self._lock = threading.Lock()
        self._failure: SnapshotChangedError | None = None
        self._found = False
        self._committing = False
        self._stepped: set[int] = set()
        #: Figures of this snapshot: bytes copied in the background and how long that
        #: took (device-to-host included), bytes reused unchanged.
        self.deferred_bytes = 0
        self.deferred_seconds = 0.0
        self.reused_bytes = 0

    # ------------------------------------------------------------------ at save()

    def declare(self, model: torch.nn.Module | None, optimizers: Iterable[Any]) -> None:
        """Which tensors the passed optimizers own (deferred: copied later, when the
        optimizer can be hooked) and which are frozen (reused when unchanged)."""
        opts = [o for o in (torch_optimizer(x) for x in optimizers) if o is not None]
        for opt in opts:
            for group in opt.param_groups:
                for p in group["params"]:
                    self._owned[p.data_ptr()] = id(opt)
                    for value in opt.state.get(p, {}).values():
                        if isinstance(value, torch.Tensor) and value.numel() > 0:
                            self._owned[value.data_ptr()] = id(opt)
        if model is not None:
            for p in model.parameters():
                if not p.requires_grad and p.numel() > 0 and p.data_ptr() not in self._owned:
                    self._frozen.add(p.data_ptr())
        if not self.deferred:
            return
        # Schedule-free optimizers rewrite the weights in train()/eval() (through .data,
        # unseen by version counters), outside step(): what they own is copied at once.
        hookable = [o for o in opts if not callable(getattr(o, "train", None))
                    and not callable(getattr(o, "eval", None))]  # fmt: skip
        devices = {p.device for p in _params(hookable)}
        if len(devices) > 1:
            hookable = []  # weights over several devices (device_map): copied at once
        for opt in hookable:
            self.owner.hook(opt)
            self._deferrable.add(id(opt))
        device = next(iter(devices), None) if hookable else None
        if device is not None and device.type == "cuda":
            # The copy stream starts after everything queued before save() on it.
            self._device = device
            self._ready_event = torch.cuda.current_stream(device).record_event()

    def take(self, key: str, tensor: torch.Tensor) -> str:
        """Take one tensor: ``"reused"`` (unchanged frozen tensor: nothing to do),
        ``"deferred"`` (copied in the background), ``"copied"`` (in the host buffer now)
        or ``"live"`` (synchronous save: written from the tensor itself)."""
        t = tensor.detach()
        ptr = t.data_ptr() if t.numel() > 0 else 0
        if ptr and ptr in self._frozen:
            held = self.owner._held.get(key)
            if (
                held is not None
                and held.source.data_ptr() == ptr
                and held.source._version == held.version == t._version
                and held.source.shape == t.shape
                and held.source.stride() == t.stride()
                and held.source.dtype == t.dtype
                and (held.buffered or not self.buffered)
                and (not self.buffered or self.owner.buffers.holds(key, t))
                # A synchronous save has no copy to compare with in the background:
                # its sample of the elements is compared now (edits through .data).
                and (self.buffered or _same(held.sample, _sample(t)))
            ):
                item = _Item(key, t)
                if self.buffered:
                    # Picked now, in stream order: what the tensor holds at save(),
                    # compared with its copy in the background.
                    item.sample = _pick(t)
                    self._sampled_on_device = self._sampled_on_device or t.is_cuda
                self.reused.append(item)
                self.reused_bytes += t.numel() * t.element_size()
                return "reused"
        if self.deferred and ptr and self._owned.get(ptr) in self._deferrable:
            self.owner.forget(key)
            self.items.append(_Item(key, t, self._owned[ptr]))
            return "deferred"
        if not self.buffered:
            if ptr in self._frozen:
                self._hold(key, t, buffered=False)
                self.owner._held[key].sample = _sample(t)
            return "live"
        self.owner.forget(key)
        self.owner.buffers.copy(key, t)
        if ptr in self._frozen:
            self._hold(key, t, buffered=True)
        return "copied"

    def abandon(self) -> None:
        """The save failed before its background part started: nothing is copied later,
        and no optimizer step may wait for it."""
        self.items.clear()
        self._copied.set()
        if self.owner._current is self:
            self.owner._current = None

    def _hold(self, key: str, t: torch.Tensor, *, buffered: bool) -> None:
        self.owner._held[key] = _Held(t, t._version, next(self.owner._generations), buffered)

    def taken(self) -> None:
        """``save()`` has taken every tensor. Device-to-host copies made now are waited
        for here (eager: copied when ``save()`` returns), or by the background through an
        event (deferred: training is not held up for them)."""
        buffers = self.owner.buffers
        if not self.buffered or not (buffers.on_device or self._sampled_on_device):
            return
        if self.deferred and self._device is not None and buffers.devices <= {self._device}:
            # Covers the eager copies and the samples of reused tensors queued so far.
            self._eager_event = torch.cuda.current_stream(self._device).record_event()
        else:
            buffers.synchronize()
            if self._sampled_on_device:
                torch.cuda.synchronize()  # the samples of reused tensors (small)

    # ------------------------------------------------------------------ background

    def copy_deferred(self) -> None:
        """Copy the deferred tensors into the host buffers (in the background), check
        that none changed meanwhile, and spot-check the reused ones. Raises the
        :class:`~savepoints.errors.SnapshotChangedError` of a change it finds.

        Until every copy is issued, no hooked optimizer step can run (its pre-hook waits),
        so any version change seen then is a violation. Afterwards a step may change the
        tensors legitimately (on a GPU, ordered after the copies by an event): then the
        step's pre-hook has checked them, and only without a step are they checked
        again once the copies are complete."""
        buffers = self.owner.buffers
        started = time.perf_counter()
        stream = None
        try:
            if self._eager_event is not None:
                self._eager_event.synchronize()
            if self._ready_event is not None and self._device is not None:
                stream = self.owner.copy_stream(self._device)
                stream.wait_event(self._ready_event)
            with _on_stream(stream):
                for item in self.items:
                    buffers.copy(item.key, item.source)
                    self._check([item], _BEFORE_COPY_ENDED)
                if stream is not None:
                    self._copy_event = stream.record_event()
        finally:
            self._copied.set()  # a failed copy must not leave the optimizer step waiting
        if self._copy_event is not None:
            self._copy_event.synchronize()
        self.deferred_seconds = time.perf_counter() - started
        self.deferred_bytes = sum(i.source.numel() * i.source.element_size() for i in self.items)
        with self._lock:
            unchecked = [i for i in self.items if i.optimizer not in self._stepped]
        self._check(unchecked, _BEFORE_COPY_ENDED)
        with _on_stream(stream):
            for item in self.reused:
                # The sample was picked at save(): a change made since does not matter.
                picked = None if item.sample is None else item.sample.cpu()
                if not _same(picked, _sample(buffers.get(item.key))):
                    self.owner.forget(item.key)  # the next save copies it again
                    self._fail(item, _UNSEEN, hint=_UNSEEN_HINT)
        self._raise_failure()

    def before_commit(self) -> None:
        """Raise the failure found so far; from now on, a failure found is a late one
        (reported by the next save or wait, the save point being committed)."""
        with self._lock:
            self._committing = True
        self._raise_failure()

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer step pre-hook: wait for the copies of what this optimizer owns,
        then check that nothing else changed them since ``save()``."""
        oid = id(optimizer)
        if not self.deferred or oid in self._stepped:
            return
        self._copied.wait()
        if self._copy_event is not None:
            torch.cuda.current_stream(self._device).wait_event(self._copy_event)
        with self._lock:
            changed = [i for i in self.items if i.optimizer == oid and i.changed]
            self._stepped.add(oid)
        if changed:
            self._fail(changed[0], "was changed in place between save() and the optimizer step")

    def _check(self, items: Iterable[_Item], when: str) -> None:
        for item in items:
            if item.changed:
                self._fail(item, when)
                self._raise_failure()

    def _fail(self, item: _Item, why: str, hint: str | None = None) -> None:
        """Record the first change found: before the commit it fails this save; after,
        it is logged at once and raised by the next ``save()`` or ``wait()``."""
        with self._lock:
            if self._found:
                return
            self._found = True
            name = display_name(item.key)
            if not self._committing:
                self._failure = SnapshotChangedError(self.step, name, why, hint=hint)
                return
        late = SnapshotChangedError(self.step, name, why, committed=True, hint=hint)
        log.error("savepoints: %s", late)
        with self.owner._lock:
            self.owner._late.append(late)

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure


def _params(opts: Iterable[torch.optim.Optimizer]) -> Iterable[torch.Tensor]:
    for opt in opts:
        for group in opt.param_groups:
            yield from group["params"]


_BEFORE_COPY_ENDED = "was changed in place after save() returned, before its copy ended"
_UNSEEN = "changed without autograd seeing it (an edit through .data, or an extension "
_UNSEEN += "writing its memory?)"
_UNSEEN_HINT = (
    "Save again: the next save copies it in full. Change frozen weights through "
    "autograd-visible operations (under torch.no_grad(), not through .data) to keep "
    "incremental saves exact."
)


def _on_stream(stream: Any) -> contextlib.AbstractContextManager[Any]:
    """Run on ``stream``, on its device (no stream: as is)."""
    if stream is None:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.cuda.device(stream.device))
    stack.enter_context(torch.cuda.stream(stream))
    return stack


def _pick(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a spread sample of ``t``'s elements (first and last included), where
    ``t`` is (on a GPU: queued on the current stream, no wait)."""
    n = t.numel()
    if n == 0:
        return torch.empty(0, dtype=torch.uint8)
    k = min(n, _SAMPLE)
    idx = torch.arange(k, dtype=torch.int64) * (n - 1) // max(k - 1, 1)  # exact integers
    return t.detach().reshape(-1).index_select(0, idx.to(t.device)).view(torch.uint8)


def _sample(t: torch.Tensor) -> torch.Tensor:
    """:func:`_pick`, on the CPU."""
    return _pick(t).cpu()


def _same(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    return a is not None and torch.equal(a, b)


def _same_sample(live: torch.Tensor, copy: torch.Tensor) -> bool:
    """Whether ``live`` and ``copy`` hold the same bytes at a spread sample of elements."""
    return _same(_sample(copy), _sample(live))
