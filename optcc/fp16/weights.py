"""Float16 copies of float32 weights, made once per tensor and shared by every candidate
the conversion evaluates and by the converted model itself.

``Float16Weights(spill=False)`` (models held in memory) makes each float16 tensor in
memory, as ``ir.tensor`` of the converted array, every time it is asked (small models:
nothing to share). Its ``rounded`` tensors (float32 holding float16's values, which the
emulated candidates read) are made once per source tensor and shared by every candidate:
a search over many candidates then holds one rounded copy of the weights, not one each.
``spill=True`` (models with external data) writes each float16 tensor once into a file
of a temporary folder and hands out one ``ExternalTensor`` for it (or, asked for, an
in-memory copy read back from that file): the
source is read from its own file in bounded chunks (never through onnx-ir's memory map,
whose pages would stay resident), so no float32 or float16 copy of all weights is ever
held in memory. The folder lives as long as any tensor made in it (each holds it), so
the converted model stays valid after the pass returns; it is removed when the last
such tensor is collected, or at exit.

Conversion (both modes): finite values beyond +-65504 become +-65504 and are reported
(one line per tensor, as ``rewrite`` words it); NaN and +-inf are kept.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator

import numpy as np
import onnx_ir as ir

from optcc import ir as oir
from optcc.fp16.rewrite import FP16_MAX, FLOAT16, RewriteStats, _rounded, _to_float16, flat_chunks

__all__ = ["Float16Weights", "float32_values"]

_CHUNK_ELEMENTS = 1 << 22  # 16 MiB of float32 at a time, read from a file
_ALIGN = 4096


class _SpilledTensor(ir.ExternalTensor):  # pylint: disable=too-many-ancestors
    """An external float16 tensor in a temporary folder it keeps alive."""

    __slots__ = ("_folder",)


def _float32_chunks(tensor: ir.TensorProtocol) -> Iterator[np.ndarray]:
    """The tensor's values as flat float32 chunks, an external one read from its file."""
    if isinstance(tensor, ir.ExternalTensor):
        left = tensor.size
        with open(tensor.path, "rb") as f:
            f.seek(tensor.offset or 0)
            while left > 0:
                count = min(left, _CHUNK_ELEMENTS)
                data = f.read(4 * count)
                if len(data) != 4 * count:
                    raise OSError(f"external data of '{tensor.name}' ends early in {tensor.path}")
                yield np.frombuffer(data, dtype="<f4").astype(np.float32, copy=False)
                left -= count
        return
    yield from flat_chunks(np.asarray(oir.decoded(tensor), dtype=np.float32))


def _rounded_in_chunks(tensor: ir.TensorProtocol) -> np.ndarray:
    """``_rounded`` of the tensor's values, computed a chunk at a time into one array (its
    temporaries are a chunk's, not several copies of the whole tensor)."""
    return _filled(tensor, _rounded)


def float32_values(tensor: ir.TensorProtocol) -> np.ndarray:
    """A float32 tensor's values: an external tensor's read from its file in chunks into an
    array of their own, which goes with its last reference (never through onnx-ir's map of
    the file, whose pages stay resident as long as the tensor lives); an in-memory tensor's
    own array."""
    if not isinstance(tensor, ir.ExternalTensor):
        return tensor.numpy()
    return _filled(tensor, lambda chunk: chunk)


def _filled(tensor: ir.TensorProtocol, convert: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """An array of the tensor's shape holding ``convert`` of its values, a chunk at a time."""
    out = np.empty(tuple(tensor.shape.numpy()), dtype=np.float32)
    flat, start = out.reshape(-1), 0
    for chunk in _float32_chunks(tensor):
        flat[start:start + chunk.size] = convert(chunk)
        start += chunk.size
    return out


class Float16Weights:
    """Float16 versions of float32 weight tensors (see the module docstring)."""

    def __init__(self, spill: bool) -> None:
        self.spill = spill
        self._made: dict[int, tuple[ir.TensorProtocol, ir.TensorProtocol, str | None]] = {}
        # per source tensor (kept, so that its id is not reused): its rounded float32 tensor
        self._rounded: dict[int, tuple[ir.TensorProtocol, ir.TensorProtocol]] = {}
        self._folder: tempfile.TemporaryDirectory | None = None
        self._file: str | None = None
        self._end = 0

    def get(self, tensor: ir.TensorProtocol, name: str, in_memory: bool = False
            ) -> tuple[ir.TensorProtocol, str | None]:
        """The float16 tensor for float32 ``tensor`` (named ``name``), and the clamp note
        (None when no value was beyond +-65504). ``in_memory``: an in-memory tensor even
        when spilling (the same values, read back from the file)."""
        if not self.spill:
            stats = RewriteStats()
            array = _to_float16(oir.decoded(tensor), name, stats)
            return ir.tensor(array, name=name), (stats.clamped[0] if stats.clamped else None)
        made = self._made.get(id(tensor))
        if made is None or made[0] is not tensor:
            made = (tensor, *self._spill(tensor, name))
            self._made[id(tensor)] = made
        half, note = made[1], made[2]
        if in_memory:
            assert isinstance(half, ir.ExternalTensor)
            with open(half.path, "rb") as f:
                f.seek(half.offset or 0)
                array = np.frombuffer(f.read(half.nbytes), dtype="<f2").astype(np.float16, copy=False)
            half = ir.tensor(array.reshape(half.shape.numpy()), name=name)
        return half, note

    def rounded(self, tensor: ir.TensorProtocol, name: str) -> ir.TensorProtocol:
        """Float32 ``tensor`` as float16 storage gives it back, in float32 (clamped to
        +-65504, non-finite kept), named ``name``: made once per source tensor, in bounded
        chunks, and the same tensor for every later call."""
        made = self._rounded.get(id(tensor))
        if made is None or made[0] is not tensor:
            made = (tensor, ir.tensor(_rounded_in_chunks(tensor), name=name))
            self._rounded[id(tensor)] = made
        return made[1]

    def _spill(self, tensor: ir.TensorProtocol, name: str) -> tuple[ir.TensorProtocol, str | None]:
        if self._folder is None:
            self._folder = tempfile.TemporaryDirectory(prefix="optcc-fp16-weights-")
            self._file = "weights.float16"
        assert self._file is not None
        path = os.path.join(self._folder.name, self._file)
        start = -(-self._end // _ALIGN) * _ALIGN
        over, peak = 0, 0.0
        with open(path, "ab") as f:
            f.truncate(start)
            f.seek(start)
            for chunk in _float32_chunks(tensor):
                finite = np.isfinite(chunk)
                beyond = finite & (np.abs(chunk) > FP16_MAX)
                if finite.any():
                    peak = max(peak, float(np.abs(chunk[finite]).max()))
                if beyond.any():
                    over += int(beyond.sum())
                    chunk = np.where(beyond, np.sign(chunk) * FP16_MAX, chunk)
                f.write(chunk.astype("<f2").tobytes())
            self._end = f.tell()
        length = self._end - start
        half = _SpilledTensor(self._file, start, length, FLOAT16, shape=ir.Shape(tensor.shape.numpy()),
                              name=name, base_dir=self._folder.name)
        half._folder = self._folder  # the folder goes when the last tensor made in it goes
        note = None if not over else (
            f"'{name}': {over} value(s) beyond +-65504 (max |x| {peak:.6g}) clamped to +-65504")
        return half, note
