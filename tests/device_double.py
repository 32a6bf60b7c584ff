"""A stand-in accelerator for tests on a machine without one: real values, a separate device, and a
count of everything that would synchronise the host with a CUDA device.

Tensors "on the device" are :class:`DeviceTensor` wrappers: they report ``device='meta'`` (a device type
that every PyTorch build has, so autograd and ``nn.Module.to`` work) while holding real CPU values, so
the whole computation, native pairings included, runs for real. Inside :class:`DeviceDouble`:

* ``x.to(DEVICE)`` / ``module.to(DEVICE)`` / factories with ``device=DEVICE`` make device tensors;
  ``x.cpu()`` of a device tensor makes an ordinary CPU tensor (a device-to-host transfer);
* an operation that mixes device tensors with host tensors of one or more dimensions raises, as CUDA
  does ("Expected all tensors to be on the same device"); 0-dim host tensors are allowed (CUDA takes
  them as scalars), so are host index tensors in indexing (CUDA copies them over: counted as a
  host-to-device transfer), and cross-device copies;
* the counters ``syncs`` (host waits for the device: a scalar read such as ``.item()``/``bool()``/
  ``.tolist()``, an operation whose output size depends on device values such as ``nonzero``,
  ``unique``, boolean-mask indexing, ``masked_select``, ``bincount``, ``repeat_interleave`` without
  ``output_size``, ``equal``, or a blocking copy in either direction), ``d2h`` and ``h2d`` (transfers)
  record what the code under test did, each with the operation's name in ``events``.

This is a model of CUDA's rules, not CUDA: it catches device mixing and counts synchronisations, it
does not check streams, pinned memory or that a non-blocking copy is waited for before its use.
"""
from __future__ import annotations

import threading

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("meta")

# Operations whose output size depends on device values: CUDA must wait for the device to size them.
_DATA_DEPENDENT = {"nonzero", "_unique", "_unique2", "unique_dim", "unique_consecutive", "masked_select",
                   "bincount", "equal", "is_nonzero", "histogram", "argwhere"}
_COPIES = {"_to_copy", "copy_", "to", "_copy_from", "_copy_from_and_resize"}
_INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_", "_unsafe_index", "_unsafe_index_put"}


class DeviceTensor(torch.Tensor):
    """A tensor on the stand-in device, holding real values in ``inner`` (a CPU tensor)."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        r = torch.Tensor._make_wrapper_subclass(
            cls, inner.size(), strides=inner.stride(), storage_offset=inner.storage_offset(), dtype=inner.dtype,
            device=DEVICE, requires_grad=inner.requires_grad, layout=inner.layout)
        r.inner = inner
        return r

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        mode = _ACTIVE.get()
        if mode is None:
            raise RuntimeError(f"{func} on a device tensor outside DeviceDouble (e.g. in a thread it did not enter)")
        return mode._run(func, args, kwargs or {})

    def __repr__(self, *, tensor_contents=None):
        return f"DeviceTensor({self.inner!r})"


class _Active(threading.local):
    mode = None

    def get(self):
        return self.mode


_ACTIVE = _Active()


def _is_dev(t) -> bool:
    return isinstance(t, DeviceTensor)


def _wants_device(dev) -> bool:
    return dev is not None and torch.device(dev).type == DEVICE.type


def _wants_host(dev) -> bool:
    return dev is not None and torch.device(dev).type == "cpu"


class DeviceDouble(TorchDispatchMode):
    """Context manager: inside it :data:`DEVICE` behaves as a separate accelerator (module docstring).

    ``counts()`` gives ``dict(syncs=, d2h=, h2d=)`` since the last ``reset()``; ``events`` lists them.
    """

    def __init__(self):
        super().__init__()
        self.reset()

    def reset(self) -> None:
        self.events: list[tuple[str, str, int]] = []

    def counts(self, thread: str = "main") -> dict:
        """Counts of the events of the thread that entered the mode (``"main"``), of the other threads
        (``"workers"``), or of all (``"all"``)."""
        out = dict(syncs=0, d2h=0, h2d=0)
        for kind, _, tid in self.events:
            if thread == "all" or (tid == self._main) == (thread == "main"):
                out[kind] += 1
        return out

    def note_sync(self, what: str) -> None:
        """Record a host synchronisation the dispatcher cannot see (e.g. waiting on an event)."""
        self._note("syncs", what)

    def __enter__(self):
        self._prev = _ACTIVE.mode
        _ACTIVE.mode = self
        self._main = threading.get_ident()
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.mode = self._prev
        return super().__exit__(*exc)

    def _note(self, kind: str, what: str) -> None:
        self.events.append((kind, what, threading.get_ident()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self._run(func, args, kwargs or {})

    def _run(self, func, args, kwargs):
        name = func.overloadpacket.__name__
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        on_dev = [t for t in tensors if _is_dev(t)]
        on_host = [t for t in tensors if not _is_dev(t)]
        if any(t.device.type == DEVICE.type for t in on_host):
            # PyTorch made a tensor on the device without dispatching (e.g. from a Python list used as an
            # index): on CUDA that is a hidden host-to-device copy; here it would hold no values
            raise RuntimeError(f"{func}: a device tensor made outside the dispatcher (indexing a device tensor with a "
                               f"Python list?): build the index tensor explicitly, once")
        target = kwargs.get("device")
        if name in _COPIES:
            return self._copy(func, name, args, kwargs, on_dev, target)
        if on_dev and on_host:
            if name in _INDEXING:
                idx = [t for t in on_host if t.dim() > 0]
                for t in idx:
                    self._note("h2d", f"{name} with a host index tensor {tuple(t.shape)}")
                    self._note("syncs", f"{name}: blocking copy of a host index tensor")
            elif any(t.dim() > 0 for t in on_host):
                shapes = [tuple(t.shape) for t in on_host if t.dim() > 0]
                raise RuntimeError(f"Expected all tensors to be on the same device, but {func} got tensors on "
                                   f"{DEVICE.type} (the device) and host tensors of shapes {shapes}")
        device_op = bool(on_dev) or _wants_device(target)
        if on_dev:
            if name == "_local_scalar_dense":
                self._note("syncs", "scalar read (.item(), bool(), int(), .tolist())")
            elif name in _DATA_DEPENDENT:
                self._note("syncs", name)
            elif name in _INDEXING and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool
                                           for t in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple))
                                                     else [])):
                self._note("syncs", f"{name} with a boolean mask")
            elif name == "repeat_interleave" and kwargs.get("output_size") is None and (
                    len(args) < 2 or isinstance(args[1], torch.Tensor) or args[0].dim() > 0 and _is_dev(args[0])
                    and len(args) == 1):
                self._note("syncs", "repeat_interleave without output_size")
        un = lambda t: t.inner if _is_dev(t) else t  # noqa: E731
        uargs, ukw = tree_map(un, args), tree_map(un, kwargs)
        if _wants_device(target):
            ukw = dict(ukw, device=torch.device("cpu"))
        out = func(*uargs, **ukw)
        if not device_op or name == "_local_scalar_dense" or name == "equal" or name == "is_nonzero":
            return out
        schema = func._schema
        if schema.arguments and schema.arguments[0].alias_info is not None and schema.arguments[0].alias_info.is_write:
            return args[0]  # in place: the same device tensor
        return tree_map(lambda t: DeviceTensor(t) if isinstance(t, torch.Tensor) and not _is_dev(t) else t, out)

    def _copy(self, func, name, args, kwargs, on_dev, target):
        un = lambda t: t.inner if _is_dev(t) else t  # noqa: E731
        blocking = not kwargs.get("non_blocking", False) and not (len(args) > 2 and args[2] is True)
        if name == "copy_":
            dst, src = args[0], args[1]
            if _is_dev(dst) != _is_dev(src) and src.dim() >= 0:
                kind = "h2d" if _is_dev(dst) else "d2h"
                self._note(kind, f"copy_ {tuple(src.shape)}")
                if blocking:
                    self._note("syncs", f"blocking {kind} copy_")
            un(dst).copy_(un(src))
            return dst
        src = args[0]
        ukw = {k: v for k, v in kwargs.items()}
        src_dev = _is_dev(src)
        if _wants_device(target):
            ukw["device"] = torch.device("cpu")
            out = func(un(src), *tree_map(un, args[1:]), **ukw)
            if not src_dev:
                self._note("h2d", f"{name} {tuple(src.shape)}")
                if blocking:
                    self._note("syncs", f"blocking h2d {name}")
            return DeviceTensor(out)
        if src_dev and (_wants_host(target)):
            out = func(un(src), *tree_map(un, args[1:]), **ukw)
            self._note("d2h", f"{name} {tuple(src.shape)}")
            if blocking:
                self._note("syncs", f"blocking d2h {name}")
            return out
        out = func(un(src), *tree_map(un, args[1:]), **ukw)
        return DeviceTensor(out) if src_dev else out


class Event:
    """Stands in for a CUDA event recorded on the stand-in device's stream: ``record()`` does nothing (the
    double's copies complete at once), ``synchronize()`` is counted as a host synchronisation of its thread."""

    def __init__(self, mode: DeviceDouble):
        self.mode = mode

    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        self.mode.note_sync("event wait")


def to_device(tree):
    """Every tensor in ``tree`` (a tensor, list, tuple or dict; or a module) on the device (inside the mode)."""
    if isinstance(tree, torch.nn.Module):
        return tree.to(DEVICE)
    return tree_map(lambda t: t.to(DEVICE) if isinstance(t, torch.Tensor) else t, tree)


def values(t: torch.Tensor) -> torch.Tensor:
    """The CPU values of a device tensor (no transfer is counted); other tensors are returned as they are."""
    return t.inner if _is_dev(t) else t
