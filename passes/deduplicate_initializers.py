"""DeduplicateInitializersPass: keep one copy of initializers with identical contents.

Rewrite: an initializer with the same dtype, shape and bytes as an earlier one of its
graph, or of an enclosing graph (a body reads outer values by name), is removed and its
readers read the kept one. Graph inputs that are also initializers are never merged,
neither removed nor kept (a caller may override them), and neither are graph outputs.
A kept value of an enclosing graph is used only when its name is defined nowhere else
in the model, so name lookup from the body cannot find another value.

Reading weights: initializers are first grouped by (dtype, shape); only groups of two or
more are read. An in-memory tensor is then told apart by its "fingerprint": its whole
bytes when it has at most ``_SMALL_BYTES`` of them (then they are its key, exact, and
nothing is hashed), else its first and last ``_EDGE_BYTES`` bytes; tensors whose
fingerprint no other tensor of their group shares cannot equal any other and are not
read further. The rest are read once to hash them (SHA-256 over their bytes, kept in
the tensor's metadata for the later runs of the pass), and a hash match is confirmed
byte for byte before anything is removed. External data is read from its file
in bounded chunks, not through onnx-ir's memory map: a map would keep every page read
resident for the rest of the run (a 2.3 GB model's whole weights).

onnx-ir's ``DeduplicateInitializersPass`` (default size limit 1024 elements) and
``DeduplicateHashedInitializersPass`` (reads every tensor, even those no other tensor
could equal) only deduplicate within each graph and log a warning for every initializer
that is a graph input (every one in older models); this pass does the cross-scope case
and stays quiet.

Exact: readers get a tensor with identical dtype, shape and bytes.
"""

from __future__ import annotations

import collections
import hashlib
import math
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

import optcc

__all__ = ["DeduplicateInitializersPass"]


_CHUNK_BYTES = 16 << 20
_PROTO_TENSOR = ir.serde.TensorProtoTensor
# tensors whose bytes are in memory (``type``: isinstance checks of onnx-ir's classes are slow)
_IN_MEMORY = (ir.Tensor, _PROTO_TENSOR)


def _data(tensor: ir.TensorProtocol) -> np.ndarray:
    """The tensor's bytes as a flat uint8 array (a view where the storage allows)."""
    if type(tensor) is _PROTO_TENSOR and np.little_endian:
        proto = tensor.raw
        dtype = ir.DataType(proto.data_type)
        if dtype in optcc.ir.RAW_DTYPES and proto.HasField("raw_data"):
            raw = proto.raw_data  # what numpy() reads, without building the typed array
            if len(raw) == dtype.itemsize * math.prod(proto.dims):
                return np.frombuffer(raw, dtype=np.uint8)
    if tensor.dtype == ir.DataType.STRING:
        joined = b"".join(len(s).to_bytes(8, "little") + s for s in tensor.string_data())
        return np.frombuffer(joined, dtype=np.uint8)
    array = np.ascontiguousarray(optcc.ir.decoded(tensor))  # read only
    return array.reshape(-1).view(np.uint8)


def _chunks(tensor: ir.TensorProtocol) -> Iterator[memoryview]:
    """The tensor's bytes in order, at most ``_CHUNK_BYTES`` at a time; an external
    tensor's are read from its file (nothing of it stays in memory)."""
    if isinstance(tensor, ir.ExternalTensor) and tensor.dtype.bitwidth >= 8 and tensor.size > 0:
        buffer = bytearray(min(_CHUNK_BYTES, tensor.nbytes))
        with open(tensor.path, "rb") as f:
            f.seek(tensor.offset or 0)
            left = tensor.nbytes
            while left > 0:
                view = memoryview(buffer)[: min(left, len(buffer))]
                got = f.readinto(view)
                if not got:
                    raise OSError(f"external data of '{tensor.name}' ends early in {tensor.path}")
                yield view[:got]
                left -= got
        return
    data = memoryview(_data(tensor))
    for start in range(0, max(1, data.nbytes), _CHUNK_BYTES):
        yield data[start:start + _CHUNK_BYTES]


_DIGEST_KEY = "optcc.sha256"


def _digest(tensor: ir.TensorProtocol) -> bytes:
    """SHA-256 of the tensor's bytes, kept in its metadata: onnx-ir tensors are immutable,
    and clones share them, so later calls (and later runs of this pass) read it again
    (a stale digest could only miss a match: every match is confirmed byte for byte)."""
    digest = tensor.meta.data.get(_DIGEST_KEY)  # the store's own dict: its Mapping methods are slow
    if digest is None:
        h = hashlib.sha256()
        for chunk in _chunks(tensor):
            h.update(chunk)
        digest = tensor.meta[_DIGEST_KEY] = h.digest()
    return digest


def _same_bytes(a: ir.TensorProtocol, b: ir.TensorProtocol) -> bool:
    if type(a) in _IN_MEMORY and type(b) in _IN_MEMORY:
        return _data(a).tobytes() == _data(b).tobytes()  # both in memory: compared at once
    left, right = _chunks(a), _chunks(b)
    pending_a, pending_b = b"", b""
    while True:
        if not pending_a:
            pending_a = bytes(next(left, b""))
        if not pending_b:
            pending_b = bytes(next(right, b""))
        if not pending_a or not pending_b:
            return not pending_a and not pending_b and next(left, None) is None and next(right, None) is None
        n = min(len(pending_a), len(pending_b))
        if pending_a[:n] != pending_b[:n]:
            return False
        pending_a, pending_b = pending_a[n:], pending_b[n:]


_SMALL_BYTES = 64  # tensors of at most this many bytes are keyed by their bytes
_EDGE_BYTES = 32  # the fingerprint of a larger in-memory tensor: this many bytes at each end
_FINGERPRINT_KEY = "optcc.dedup.fingerprint"


def _fingerprint(tensor: ir.TensorProtocol) -> tuple[bool, bytes | None]:
    """(whole, bytes): the tensor's bytes when ``whole`` (at most ``_SMALL_BYTES``), else
    its first and last ``_EDGE_BYTES`` bytes; (False, None) for a string tensor or one
    not known to be in memory (an external tensor: not read here). Equal tensors of one dtype and shape have equal fingerprints.
    Kept in the tensor's metadata, as the digest is (tensors are immutable)."""
    cached = tensor.meta.data.get(_FINGERPRINT_KEY)  # the store's own dict: its Mapping methods are slow
    if cached is not None:
        return cached
    if type(tensor) not in _IN_MEMORY or tensor.dtype == ir.DataType.STRING:
        found: tuple[bool, bytes | None] = (False, None)
    else:
        data = _data(tensor)
        if data.nbytes <= _SMALL_BYTES:
            found = (True, data.tobytes())
        else:
            found = (False, data[:_EDGE_BYTES].tobytes() + data[-_EDGE_BYTES:].tobytes())
    tensor.meta[_FINGERPRINT_KEY] = found
    return found


def _candidates(graph: ir.Graph) -> list[ir.Value]:
    return [
        v
        for v in graph.initializers.data.values()  # the UserDict's own dict: its Mapping views are slow
        if v.const_value is not None and not v.is_graph_input() and not v.is_graph_output()
    ]


def _group(value: ir.Value) -> tuple[int, tuple[int, ...]]:
    tensor = value.const_value
    assert tensor is not None
    if type(tensor) is _PROTO_TENSOR:  # its dtype and shape, read without building a Shape
        proto = tensor.raw
        # the dtype's number: equal (and hashed alike) to the ir.DataType (an IntEnum) of it
        return proto.data_type, tuple(proto.dims)
    return tensor.dtype, tuple(tensor.shape)


def _defined_names(model: ir.Model) -> collections.Counter[str]:
    names: collections.Counter[str] = collections.Counter()
    for graph in optcc.ir.graphs(model):
        names.update(v.name for v in graph.inputs if v.name)
        if isinstance(graph, ir.Graph):
            names.update(n for n, v in graph.initializers.items() if not v.is_graph_input())
        for node in graph:
            names.update(v.name for v in node.outputs if v.name)
    return names


def _enclosing_graphs(model: ir.Model) -> dict[int, list[ir.Graph]]:
    """For each graph (by id): itself and the graphs around it, innermost first (onnx-ir
    graphs do not link to the node that holds them, so the chains are built here)."""
    chains: dict[int, list[ir.Graph]] = {id(model.graph): [model.graph]}
    for graph in optcc.ir.graphs(model):  # parents come before their bodies
        outer = chains.get(id(graph), [])
        for node in graph:
            for body in optcc.ir.subgraphs(node):
                chains[id(body)] = [body, *outer]
    return chains


class DeduplicateInitializersPass(optcc.Pass):
    """Merge initializers with equal dtype, shape and bytes, across If/Loop/Scan scopes.

    Preconditions and how weights are read: see the module docstring.
    """

    name = "deduplicate-initializers"
    numerics = "exact"

    def call(self, model: ir.Model) -> optcc.PassResult:
        graphs = [g for g in optcc.ir.graphs(model) if isinstance(g, ir.Graph)]
        candidates = {id(g): [(v, _group(v)) for v in _candidates(g)] for g in graphs}
        sizes = collections.Counter(group for pairs in candidates.values() for _, group in pairs)
        # within each group of two or more, only fingerprints two tensors share are read further
        candidates = {
            graph_id: [(v, (*group, *_fingerprint(v.const_value))) for v, group in pairs if sizes[group] > 1]
            for graph_id, pairs in candidates.items()
        }
        sizes = collections.Counter(group for pairs in candidates.values() for _, group in pairs)
        if len(graphs) == 1:  # no bodies: no enclosing scope, no shadowing to check
            names: collections.Counter[str] = collections.Counter()
            chains = {id(model.graph): [model.graph]}
        else:
            names = _defined_names(model)
            chains = _enclosing_graphs(model)
        kept: dict[int, dict[tuple[object, ...], ir.Value]] = {}  # id(graph) -> key -> value
        removed, saved = 0, 0
        for graph in graphs:  # enclosing graphs come before their bodies
            table = kept.setdefault(id(graph), {})
            for value, group in candidates[id(graph)]:
                if sizes[group] < 2:
                    continue
                whole = group[2]
                key = (*group, b"" if whole else _digest(value.const_value))
                match = self._find(key, value, chains.get(id(graph), [graph]), kept, names)
                if match is None:
                    table.setdefault(key, value)
                    continue
                value.replace_all_uses_with(match)
                del graph.initializers[value.name]
                removed += 1
                saved += int(value.const_value.nbytes)
        stats = {"initializers": removed, "bytes": saved} if removed else {}
        return optcc.PassResult(model, bool(removed), stats)

    @staticmethod
    def _find(
        key: tuple[object, ...],
        value: ir.Value,
        scopes: list[ir.Graph],
        kept: dict[int, dict[tuple[object, ...], ir.Value]],
        names: collections.Counter[str],
    ) -> ir.Value | None:
        for scope in scopes:
            match = kept.get(id(scope), {}).get(key)
            if match is None:
                continue
            if scope is not scopes[0] and names[match.name] != 1:
                continue  # another value of that name could shadow it inside the body
            assert match.const_value is not None and value.const_value is not None
            if key[2] or _same_bytes(match.const_value, value.const_value):
                return match  # a whole-bytes key is the bytes: equal keys are equal tensors
        return None
