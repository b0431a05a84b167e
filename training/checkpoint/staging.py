"""Snapshots of state to host memory, the only part of an asynchronous save the training step waits for.

A snapshot copies every tensor storage once (views of one storage stay views of one copy, so the file written from it
is the one `torch.save` would have written from the live state) into host memory, pinned when it comes from a GPU,
and rebuilds the containers around the copies. After it returns, the step may change the live state in place.
"""
from __future__ import annotations

import copy
import enum
from collections import OrderedDict

import torch

# Leaves that are values, never changed in place: kept as they are
_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes, enum.Enum, torch.dtype, torch.device, torch.Size,
              torch.memory_format, torch.layout)


class HostStaging:
    """Copies state into host buffers. Pinned buffers (cudaHostAlloc is slow) are kept for the next snapshot of the
    same sizes; plain host buffers are freed with their snapshot."""

    def __init__(self):
        self._pinned: dict[int, list[torch.UntypedStorage]] = {}
        self._lent: list[torch.UntypedStorage] = []

    def snapshot(self, obj):
        """A copy of `obj` (nested dicts, lists, tuples, tensors, Parameters and small objects) whose tensors live in
        host memory and share nothing with the live state. On a GPU the copies are complete when this returns."""
        storages: dict[tuple, torch.UntypedStorage] = {}
        out = self._copy(obj, storages)
        if any(s.is_pinned() for s in storages.values()):
            torch.cuda.synchronize()  # the non-blocking device-to-host copies have landed
        return out

    def release(self) -> None:
        """The snapshots taken so far are written: their pinned buffers may be reused."""
        for storage in self._lent:
            self._pinned.setdefault(storage.nbytes(), []).append(storage)
        self._lent = []

    def _copy(self, obj, storages: dict):
        if isinstance(obj, torch.Tensor):
            return self._copy_tensor(obj, storages)
        if isinstance(obj, _IMMUTABLE):
            return obj
        if isinstance(obj, (dict, OrderedDict)):
            out = copy.copy(obj)  # the same mapping type (OrderedDict, defaultdict) with its attributes
            out.clear()
            out.update((k, self._copy(v, storages)) for k, v in obj.items())
            return out
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
            return type(obj)(*(self._copy(v, storages) for v in obj))
        if isinstance(obj, (list, tuple, set, frozenset)):
            return type(obj)(self._copy(v, storages) for v in obj)
        return copy.deepcopy(obj)  # a small record (a loss scaler, a fragment address): its state at this moment

    def _copy_tensor(self, tensor: torch.Tensor, storages: dict) -> torch.Tensor:
        source = tensor.untyped_storage()
        key = (source.data_ptr(), source.nbytes(), str(tensor.device))
        if key not in storages:
            storages[key] = self._host_storage(source)
        view = torch.empty(0, dtype=tensor.dtype).set_(storages[key], tensor.storage_offset(), tensor.size(),
                                                        tensor.stride())
        if isinstance(tensor, torch.nn.Parameter):
            return torch.nn.Parameter(view, requires_grad=tensor.requires_grad)
        return view

    def _host_storage(self, source: torch.UntypedStorage) -> torch.UntypedStorage:
        pinned = source.device.type == "cuda"
        if pinned and self._pinned.get(source.nbytes()):
            target = self._pinned[source.nbytes()].pop()
        else:
            target = torch.empty(source.nbytes(), dtype=torch.uint8, pin_memory=pinned).untyped_storage()
        if pinned:
            self._lent.append(target)
        target.copy_(source, non_blocking=pinned)
        return target


def nonfinite_entries(obj, where: str) -> list[str]:
    """The key paths of the non-finite floating-point tensors in a (snapshot) state, as `where:key/key`."""
    found: list[str] = []

    def visit(value, path: str) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
                found.append(f"{where}:{path}")
        elif isinstance(value, dict):
            for k, v in value.items():
                visit(v, f"{path}/{k}" if path else str(k))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                visit(v, f"{path}/{i}" if path else str(i))

    visit(obj, "")
    return found
