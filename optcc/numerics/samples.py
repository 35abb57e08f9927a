"""Sample files: feed dicts read from .npz files (one key per graph input, a leading
sample axis), for verification inputs and calibration data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from optcc.errors import BadInputError

__all__ = ["load_npz_samples"]


def load_npz_samples(path: str | os.PathLike) -> list[dict[str, np.ndarray]]:
    """Feed dicts from an .npz (or a folder of them): one key per graph input, each array
    with a leading sample axis. Object arrays are refused (nothing is unpickled)."""
    source = Path(path)
    if not source.exists():
        raise BadInputError("no such file or folder", source)
    files = sorted(source.glob("*.npz")) if source.is_dir() else [source]
    if not files:
        raise BadInputError("folder holds no .npz files", source)
    samples: list[dict[str, np.ndarray]] = []
    for file in files:
        try:
            with np.load(file, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        except ValueError as e:
            if "pickle" in str(e).lower():
                raise BadInputError("holds a pickled object array; refusing to unpickle", file) from None
            raise BadInputError(f"not a readable .npz: {e}", file) from None
        except Exception as e:  # noqa: BLE001 - zip/npy parsing errors vary
            raise BadInputError(f"not a readable .npz ({type(e).__name__})", file) from None
        counts = {key: a.shape[0] if a.ndim else -1 for key, a in arrays.items()}
        if not arrays or len(set(counts.values())) != 1 or -1 in counts.values():
            raise BadInputError(
                f"every array needs the same leading sample axis; got {counts}", file
            )
        for key, array in arrays.items():
            if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
                raise BadInputError(f"array '{key}' contains NaN or infinity", file)
        for i in range(next(iter(counts.values()))):
            samples.append({key: array[i] for key, array in arrays.items()})
    return samples
