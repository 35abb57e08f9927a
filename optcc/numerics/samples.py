"""Sample files: feed dicts read from .npz files, for verification inputs and calibration
data (the layout is described in ``load_npz_samples``)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Union

import numpy as np
import onnx
import onnx_ir as ir

from optcc.errors import BadInputError
from optcc.numerics.inputs import check_feeds

__all__ = ["SampleAxisWarning", "load_npz_samples"]


class SampleAxisWarning(UserWarning):
    """A file read as one sample whose arrays could as well be a batch of samples: each
    has its input's rank, and a leading size above 1 where the input's first dimension is
    not fixed. ``file``: that file; ``batch``: that leading size."""

    def __init__(self, message: str, file: Path, batch: int) -> None:
        super().__init__(message)
        self.file, self.batch = file, batch

ModelLike = Union[ir.Model, onnx.ModelProto, str, os.PathLike]


def load_npz_samples(
    path: str | os.PathLike,
    model: ModelLike | None = None,
    *,
    purpose: str = "verification",
) -> list[dict[str, np.ndarray]]:
    """Feed dicts from an .npz file, or from every .npz in a folder (in name order).

    Layout: one key per graph input, each array with a leading sample axis: sample ``i``
    is ``arr[i]``, shaped as the input, and every array has the same number of samples.
    A scalar (rank-0) input is therefore a 1-D array of N values, one per sample.

    With ``model`` (an ``onnx_ir.Model``, a ModelProto or the model's path), a file whose
    arrays have no sample axis is also accepted as one sample, when every array's rank is
    exactly its input's rank (``np.savez(f, x=image, sr=np.int64(16000))``). Without a
    model, a file holding a 0-d array can only be such a single sample and is read as one;
    any other file is read with the sample axis. With a model, each sample is also checked
    against the model's inputs (names, ranks, static sizes, dtypes).

    Errors name the file, the key and the sample, e.g. ``calibration sample 3 in
    calib.npz: 'x' has shape [1, 3, 32], the model expects [1,3,32,32]``; ``purpose`` is
    the first word of that label. Object arrays are refused (nothing is unpickled).
    NaN or infinity in a float array is refused for calibration (ranges are fitted on the
    values) and kept for verification: a model may read them (NaN as a missing value in a
    tree ensemble), and its outputs on them are compared as onnxruntime computes them.
    """
    source = Path(path)
    if not source.exists():
        raise BadInputError("no such file or folder", source)
    files = sorted(source.glob("*.npz")) if source.is_dir() else [source]
    if not files:
        raise BadInputError("folder holds no .npz files", source)
    ranks, ir_model = _input_ranks(model)
    samples: list[dict[str, np.ndarray]] = []
    for file in files:
        arrays = _read(file, list(ranks or ()))
        with_axis = _has_sample_axis(arrays, ranks, file)
        for key, array in arrays.items():
            if purpose == "calibration" and np.issubdtype(array.dtype, np.floating) \
                    and not np.all(np.isfinite(array)):
                raise BadInputError(f"array '{key}' contains NaN or infinity (calibration ranges are fitted on "
                                    "the values)", file)
        count = next(iter(arrays.values())).shape[0] if with_axis else 1
        if not with_axis and ir_model is not None:
            _warn_if_batched(arrays, ir_model, file)
        for i in range(count):
            # arr[i, ...] keeps a 0-d ndarray (not a NumPy scalar) for a scalar input
            sample = {key: (a[i, ...] if with_axis else a) for key, a in arrays.items()}
            if ir_model is not None:
                check_feeds(ir_model, sample, label=f"{purpose} sample {i} in {file}")
            samples.append(sample)
    if not samples:
        raise BadInputError("holds no samples (the arrays' leading sample axis has size 0)", source)
    return samples


_NPZ_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # an .npz is a zip archive of .npy files (the second: empty)
_NPY_MAGIC = b"\x93NUMPY"


def _read(file: Path, input_names: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """The arrays of an .npz by name; ``input_names`` (the model's graph inputs, when known)
    word the fix for a single .npy array."""
    try:
        with open(file, "rb") as f:
            head = f.read(len(_NPY_MAGIC))
    except OSError as e:
        raise BadInputError(f"cannot read it ({e.strerror or e})", file) from None
    if not (head.startswith(_NPZ_MAGICS) or head == _NPY_MAGIC):
        # anything else np.load would take for a pickle
        raise BadInputError("not an .npz file (a zip archive of .npy arrays, as numpy.savez writes)", file)
    if head == _NPY_MAGIC:  # one unnamed array: which input it feeds is not for optcc to guess
        names = list(input_names) or ["INPUT"]
        example = ", ".join(f"{name}=np.load('{file.name}')" if i == 0 else f"{name}=..."
                            for i, name in enumerate(names))
        raise BadInputError(
            "is a .npy file (one unnamed array), not an .npz: samples are an .npz with one array per graph "
            f"input, named as the input ({', '.join(names)}), each with a leading sample axis; make one with "
            f"np.savez('{file.stem}.npz', {example})", file)
    try:
        with np.load(file, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise BadInputError("holds a pickled object array; refusing to unpickle", file) from None
        raise BadInputError(f"not a readable .npz: {e}", file) from None
    except Exception as e:  # noqa: BLE001 - zip/npy parsing errors vary
        raise BadInputError(f"not a readable .npz ({type(e).__name__})", file) from None
    if not arrays:
        raise BadInputError("holds no arrays", file)
    return arrays


def _warn_if_batched(arrays: Mapping[str, np.ndarray], model: ir.Model, file: Path) -> None:
    """Say when a file read as one sample may have meant a batch of samples."""
    dynamic = {v.name for v in model.graph.inputs
               if v.shape is not None and v.shape.rank() and not isinstance(v.shape[0], int)}
    sizes = {a.shape[0] for key, a in arrays.items() if key in dynamic and a.ndim}
    if len(sizes) == 1 and (size := sizes.pop()) > 1:
        warnings.warn(SampleAxisWarning(
            f"{file}: read as one sample of batch {size} (each array has its input's rank); "
            f"for {size} samples, give the arrays a leading sample axis (e.g. arr[:, None])", file, size),
            stacklevel=3)


def _has_sample_axis(
    arrays: Mapping[str, np.ndarray], ranks: Mapping[str, int | None] | None, file: Path
) -> bool:
    """Whether the arrays carry a leading sample axis (see ``load_npz_samples``)."""
    known = {k: ranks.get(k) for k in arrays if ranks.get(k) is not None} if ranks else {}
    if known and all(arrays[k].ndim == r for k, r in known.items()):
        return False  # exactly the inputs' ranks: one sample without a sample axis
    if ranks is None and any(a.ndim == 0 for a in arrays.values()):
        return False
    counts = {key: a.shape[0] if a.ndim else None for key, a in arrays.items()}
    wrong = {k: list(arrays[k].shape) for k, r in known.items() if arrays[k].ndim != r + 1}
    if None in counts.values() or len(set(counts.values())) != 1 or wrong:
        shapes = {k: list(a.shape) for k, a in arrays.items()}
        expected = f"; the model's input ranks are {dict(known)}" if known else ""
        raise BadInputError(
            "every array needs the same leading sample axis (a scalar input is a 1-D array "
            f"of N values), or, for one sample, none at all; got shapes {shapes}{expected}",
            file,
        )
    return True


def _interface(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model's graph inputs and its initializers without their data: what samples are
    checked against. The parse of the file is freed on return (the onnx-ir model built
    from it is freed only by the garbage collector, and would keep every weight alive)."""
    graph = onnx.GraphProto(name=proto.graph.name, input=proto.graph.input, initializer=[
        onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims) for t in proto.graph.initializer])
    return onnx.ModelProto(ir_version=proto.ir_version, opset_import=proto.opset_import, graph=graph)


def _input_ranks(model: ModelLike | None) -> tuple[dict[str, int | None] | None, ir.Model | None]:
    """The rank of each fed graph input (None where unknown), and the model to check
    samples against. A path is read without its external data; a model that cannot be
    read gives no ranks (its loader reports the problem)."""
    if model is None:
        return None, None
    if isinstance(model, (str, os.PathLike)):
        try:
            model = _interface(onnx.load(os.fspath(model), load_external_data=False))
        except Exception:  # noqa: BLE001 - reported by the model loader, with its file
            return None, None
    if isinstance(model, onnx.ModelProto):
        try:
            model = ir.serde.deserialize_model(model)
        except Exception:  # noqa: BLE001
            return None, None
    ranks = {
        v.name: (v.shape.rank() if v.shape is not None else None)
        for v in model.graph.inputs
        if not v.is_initializer()
    }
    return ranks, model
