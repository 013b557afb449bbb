"""Reading an original checkpoint's tensors: which files, their names and shapes, and their data.

Files (mlx-lm's and transformers' rule): `model.safetensors.index.json` (sharded safetensors) or
every `*.safetensors`; only without safetensors, `pytorch_model.bin.index.json` or every
`*.bin`/`*.pt`/`*.pth` that is not a training artefact (optimizer, scheduler, RNG state, training
arguments). A tensor found in two files is an error.

Nothing is read into memory up front: safetensors headers are parsed and the data is
memory-mapped; pickles are loaded with torch's `weights_only=True` loader (memory-mapped) when
torch is installed, else with our restricted unpickler (`unpickler.py`). Each tensor is a
`TensorEntry` whose data is read, as an `mx.array`, only by `load()`.
"""

import fnmatch
import json
import math
import pickle
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import mlx.core as mx
import numpy as np

from cumo_mlx.errors import CheckpointError
from cumo_mlx.paths import regular_file

from .unpickler import NUMPY_DTYPES, load_torch_zip, unwrap_state_dict

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# Pickles that training runs leave beside the weights; never read.
TRAINING_ARTEFACTS = (
    "training_args.bin",
    "optimizer*.pt",
    "optimizer*.bin",
    "scheduler*.pt",
    "rng_state*.pth",
    "scaler.pt",
)
MAX_SAFETENSORS_HEADER = 100 << 20

# safetensors dtype -> our dtype name
SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")


@dataclass
class TensorEntry:
    """One tensor of the checkpoint: where it is, what it is, and how to read it."""

    name: str
    shape: tuple
    dtype: str  # float32, bfloat16, int64, ...
    file: Path
    read: Callable[[], np.ndarray]  # C-contiguous data (bfloat16 as uint16 bits)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(_numpy_dtype(self.dtype)).itemsize

    def load(self) -> mx.array:
        data = self.read()
        if self.dtype == "bfloat16":
            return mx.array(data.view(np.uint16)).view(mx.bfloat16)
        if self.dtype == "float64":  # MLX has no float64 on the GPU: go through float32
            data = data.astype(np.float32)
        return mx.array(data)


def _numpy_dtype(dtype: str) -> str:
    return {"bfloat16": "<u2", "bool": "?"}.get(dtype, dtype)


def is_training_artefact(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in TRAINING_ARTEFACTS)


def _read_index(path: Path) -> dict:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map must map names to file names")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, RecursionError) as e:
        raise CheckpointError(f"cannot read the index {path}: {e}", "re-download the checkpoint") from None
    return weight_map


def _files_of_index(index_name: str, weight_map: dict) -> list[str]:
    """The weight files an index names: plain file names in the checkpoint directory, nothing else."""
    files = sorted(set(weight_map.values()))
    outside = [name for name in files if name != Path(name).name or name in ("", ".", "..") or "\\" in name]
    if outside:
        raise CheckpointError(
            f"{index_name} names weight files outside the checkpoint directory: {_list(outside)}",
            "re-download the checkpoint; an index may only name files beside it",
        )
    return files


def select_weight_files(names: Iterable[str], read_index: Optional[Callable[[str], dict]] = None) -> list[str]:
    """The weight files to read among a directory's (or hub repo's) top-level file names.

    `read_index(name)` returns the weight_map of an index file; without it, index files only
    decide which format is used and every shard present is read.
    """
    names = sorted(n for n in names if "/" not in n)
    present = set(names)
    safetensors = [n for n in names if n.endswith(".safetensors")]
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES) and not is_training_artefact(n)]
    if SAFETENSORS_INDEX in present and read_index is not None:
        safetensors = _files_of_index(SAFETENSORS_INDEX, read_index(SAFETENSORS_INDEX))
    if safetensors:  # pickles beside safetensors are the same weights in the other format
        return safetensors
    if PICKLE_INDEX in present and read_index is not None:
        return _files_of_index(PICKLE_INDEX, read_index(PICKLE_INDEX))
    return pickles


def find_weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory, with clear errors for missing shards."""
    directory = Path(directory)
    names = [p.name for p in directory.iterdir() if p.is_file()]
    files = select_weight_files(names, lambda index: _read_index(directory / index))
    if not files:
        raise CheckpointError(
            f"no weights in {directory} (no *.safetensors, pytorch_model*.bin or *.pt files)",
            "point --hf-path at a CuMo checkpoint directory",
        )
    missing = [name for name in files if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{directory} is missing the weight files {', '.join(missing)} named by its index",
            "download the complete checkpoint",
        )
    return [directory / name for name in files]


def read_safetensors(path: Path) -> dict[str, TensorEntry]:
    """Entries of a safetensors file from its header; data memory-mapped on read."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is truncated (no safetensors header)", "re-download the file")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(MAX_SAFETENSORS_HEADER, size - 8):
                raise CheckpointError(
                    f"{path} is truncated or not a safetensors file "
                    f"(header of {header_len} bytes in a {size}-byte file)",
                    "re-download the file",
                )
            header = json.loads(f.read(header_len).decode("utf-8"))
    except CheckpointError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"cannot read the safetensors header of {path}: {e}", "re-download the file") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has an invalid safetensors header", "re-download the file")
    data_start = 8 + header_len
    entries = {}
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = info["dtype"]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (TypeError, KeyError, ValueError, OverflowError):
            raise CheckpointError(f"{path}: invalid header entry for '{name}'", "re-download the file") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{path}: tensor '{name}' has unsupported dtype {dtype}", "convert it to a float type first"
            )
        our_dtype = SAFETENSORS_DTYPES[dtype]
        numpy_dtype = NUMPY_DTYPES[our_dtype]
        if any(s < 0 for s in shape) or end - begin != math.prod(shape) * np.dtype(numpy_dtype).itemsize or begin < 0:
            raise CheckpointError(f"{path}: tensor '{name}' has inconsistent shape and offsets", "re-download the file")
        if data_start + end > size:
            raise CheckpointError(
                f"{path} is truncated: tensor '{name}' ends at byte {data_start + end} of a {size}-byte file",
                "re-download the file",
            )
        entries[name] = TensorEntry(
            name, shape, our_dtype, path, _memmap_reader(path, numpy_dtype, data_start + begin, shape)
        )
        spans.append((begin, end, name))
    _check_overlaps(path, spans)
    return entries


def _check_overlaps(path: Path, spans: list) -> None:
    """The format forbids tensors sharing bytes (a lying header could make two weights alias)."""
    spans = sorted(span for span in spans if span[0] < span[1])  # an empty tensor holds no bytes
    for (_, end, name), (begin, _, other) in zip(spans, spans[1:]):
        if begin < end:
            raise CheckpointError(f"{path}: tensors '{name}' and '{other}' overlap", "re-download the file")


def _memmap_reader(path: Path, dtype: str, offset: int, shape: tuple) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        if math.prod(shape) == 0:
            return np.zeros(shape, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)

    return read


def _torch():
    """torch if it can be imported (it is optional), else None."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def read_pickle(path: Path) -> dict[str, TensorEntry]:
    """Entries of a PyTorch checkpoint: torch's weights_only loader if installed, else our own."""
    torch = _torch()
    if torch is None:
        tensors = load_torch_zip(path)
        return {name: TensorEntry(name, t.shape, t.dtype, path, t.numpy) for name, t in tensors.items()}
    return _read_pickle_with_torch(torch, path)


_TORCH_DTYPES = {
    "torch.float64": "float64",
    "torch.float32": "float32",
    "torch.float16": "float16",
    "torch.bfloat16": "bfloat16",
    "torch.int64": "int64",
    "torch.int32": "int32",
    "torch.int16": "int16",
    "torch.int8": "int8",
    "torch.uint8": "uint8",
    "torch.bool": "bool",
}


def _read_pickle_with_torch(torch, path: Path) -> dict[str, TensorEntry]:
    def load(mmap: bool):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            obj = load(mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = load(mmap=False)  # legacy (pre-1.6) format: cannot be memory-mapped
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"its pickle asks for {refused.group(1)}" if refused else "its pickle holds objects other than tensors"
        raise CheckpointError(
            f"{path} is not plain tensor data: {what}, which was refused and not run",
            "only load checkpoints you trust; convert a trusted copy to safetensors",
        ) from None
    except Exception as e:  # damaged or not a torch file
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"cannot read {path}: {type(e).__name__}: {first_line}", "the file is damaged or not a PyTorch checkpoint"
        ) from None
    entries = {}
    for name, tensor in unwrap_state_dict(obj, str(path), torch.Tensor).items():
        if tensor.numel() * tensor.element_size() > tensor.untyped_storage().nbytes():
            raise CheckpointError(  # a broadcast view: reading it would take more memory than the file
                f"{path}: tensor '{name}' has more elements than its storage", "the file is damaged; re-download it"
            )
        dtype = _TORCH_DTYPES.get(str(tensor.dtype))
        if dtype is None:
            raise CheckpointError(
                f"{path}: tensor '{name}' has unsupported dtype {tensor.dtype}", "convert it to a float type first"
            )
        entries[name] = TensorEntry(name, tuple(tensor.shape), dtype, path, _torch_reader(torch, tensor))
    return entries


def _torch_reader(torch, tensor) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        t = tensor.detach().contiguous()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        return t.numpy()

    return read


def read_checkpoint(files: list[Path]) -> dict[str, TensorEntry]:
    """All tensors of the weight files, by name; a name in two files is an error."""
    entries: dict[str, TensorEntry] = {}
    duplicates = []
    for path in files:
        regular_file(path, "weight file", error=CheckpointError)  # (weights are memory-mapped, of any size)
        found = read_safetensors(path) if path.suffix == ".safetensors" else read_pickle(path)
        for name, entry in found.items():
            if name in entries:
                duplicates.append(f"{name} ({entries[name].file.name}, {path.name})")
            entries[name] = entry
    if duplicates:
        raise CheckpointError(
            f"tensors stored twice: {_list(duplicates)}",
            "keep one copy of each weight file in the checkpoint directory",
        )
    return entries


def check_index(directory: Path, entries: dict[str, TensorEntry]) -> None:
    """An index that names tensors the shards lack (or misplaces them) means a broken download."""
    for index_name in (SAFETENSORS_INDEX, PICKLE_INDEX):
        index_path = Path(directory) / index_name
        if not index_path.is_file():
            continue
        weight_map = _read_index(index_path)
        if not any(e.file.name in set(weight_map.values()) for e in entries.values()):
            continue  # the other format's index
        missing = sorted(name for name, file in weight_map.items() if name not in entries)
        if missing:
            raise CheckpointError(
                f"tensors named by {index_name} are not in its shards: {_list(missing)}", "re-download the checkpoint"
            )


def _list(names: list, limit: int = 8) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
