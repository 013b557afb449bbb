"""Reading PyTorch `.bin`/`.pt` checkpoints without torch and without running their code.

A pickle is a small program: loading one may import and call anything it names. This module
reads the zip-format checkpoints that `torch.save` writes (torch >= 1.6) with a restricted
unpickler that resolves only the names a state dict needs:

- `collections.OrderedDict` (the state dict itself),
- `torch._utils._rebuild_tensor_v2` / `_rebuild_tensor` / `_rebuild_parameter` (tensor rebuilds),
- the typed storage classes `torch.FloatStorage`, `torch.BFloat16Storage`, ... (dtype markers),

each mapped to a stand-in defined here; torch itself is never imported. Any other global, and
any persistent id that is not a tensor storage, stops the load with a CheckpointError before
the object is built, so nothing the pickle asks for runs. Tensor data is not read during
unpickling: every tensor comes back as a `PickledTensor` that reads its bytes (memory-mapped
from the zip member) only when asked, after its size and strides were checked against its
storage.
"""

import _compat_pickle
import collections
import io
import math
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from cumo_mlx.errors import CheckpointError

# our dtype name -> the numpy dtype its bytes are read as (little-endian, as torch and safetensors store them)
NUMPY_DTYPES = {
    "float64": "<f8",
    "float32": "<f4",
    "float16": "<f2",
    "bfloat16": "<u2",  # numpy has no bfloat16: read the bits
    "int64": "<i8",
    "int32": "<i4",
    "int16": "<i2",
    "int8": "i1",
    "uint8": "u1",
    "bool": "?",
}
# torch storage class name -> our dtype name
STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a pre-1.6 (non-zip) torch file
ZIP_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # the fixed 30 bytes of a zip local file header


class StorageType:
    """Stand-in for a torch typed storage class: only its dtype matters."""

    __slots__ = ("name", "numpy_dtype", "dtype")

    def __init__(self, name: str):
        self.name = name
        self.dtype = STORAGE_DTYPES[name]
        self.numpy_dtype = NUMPY_DTYPES[self.dtype]

    def __setstate__(self, state):
        raise pickle.UnpicklingError("a storage type cannot be given a state")


class Storage:
    """One storage of the checkpoint: a zip member holding `numel` elements of `dtype`."""

    __slots__ = ("key", "storage_type", "numel", "_reader")

    def __init__(self, key: str, storage_type: StorageType, numel: int, reader: Callable[["Storage"], np.ndarray]):
        self.key = key
        self.storage_type = storage_type
        self.numel = numel
        self._reader = reader

    def array(self) -> np.ndarray:
        return self._reader(self)

    def __setstate__(self, state):
        raise pickle.UnpicklingError("a storage cannot be given a state")


class PickledTensor:
    """A tensor of a pickled checkpoint: shape and dtype now, data (numpy) on `numpy()`."""

    __slots__ = ("storage", "offset", "shape", "stride")

    def __init__(self, storage: Storage, offset: int, shape: tuple, stride: tuple):
        self.storage = storage
        self.offset = offset
        self.shape = shape
        self.stride = stride

    @property
    def dtype(self) -> str:
        return self.storage.storage_type.dtype

    def numpy(self) -> np.ndarray:
        """The data as a C-contiguous numpy array (bfloat16 as its uint16 bits)."""
        flat = self.storage.array()
        itemsize = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :], shape=self.shape, strides=tuple(s * itemsize for s in self.stride), writeable=False
        )
        return np.ascontiguousarray(view)

    def __setstate__(self, state):
        raise pickle.UnpicklingError("a tensor cannot be given a state")


def _int_tuple(value, what: str) -> tuple:
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise pickle.UnpicklingError(f"tensor {what} must be a tuple of integers, got {value!r}")
    return tuple(value)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> PickledTensor:
    """Stand-in for torch._utils._rebuild_tensor(_v2): checks the view fits in its storage."""
    if not isinstance(storage, Storage):
        raise pickle.UnpicklingError("a tensor must be built on a storage")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise pickle.UnpicklingError(f"invalid storage offset {storage_offset!r}")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise pickle.UnpicklingError(f"invalid tensor size {size} / stride {stride}")
    if math.prod(size) > storage.numel:  # a broadcast view: reading it would take more memory than the file
        raise pickle.UnpicklingError(f"tensor of size {size} has more elements than its storage ({storage.numel})")
    if all(size):  # a non-empty tensor: its last element must lie inside the storage
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= storage.numel:
            raise pickle.UnpicklingError(
                f"tensor of size {size} at offset {storage_offset} overruns its storage of {storage.numel} elements"
            )
    return PickledTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_ignored):
    if not isinstance(data, PickledTensor):
        raise pickle.UnpicklingError("a parameter must wrap a tensor")
    return data


def _allowed_global(module: str, name: str):
    if (module, name) == ("collections", "OrderedDict"):
        return collections.OrderedDict
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
        return _rebuild_tensor
    if (module, name) == ("torch._utils", "_rebuild_parameter"):
        return _rebuild_parameter
    if module == "torch" and name in STORAGE_DTYPES:
        return StorageType(name)
    return None


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds state dicts of tensors and refuses everything else."""

    def __init__(self, file, storage_reader: Optional[Callable[[Storage], np.ndarray]], where: str):
        super().__init__(file)
        self._storage_reader = storage_reader
        self._storages: dict[str, Storage] = {}
        self._where = where

    def find_class(self, module: str, name: str):
        # Protocols < 3 spell some names the Python 2 way (__builtin__.eval, commands.call): read
        # them as pickle itself would, so the check and the message use the real name.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        found = _allowed_global(module, name)
        if found is None:
            raise CheckpointError(
                f"{self._where} is not plain tensor data: its pickle asks for {module}.{name}, which was "
                "refused and not run",
                "only load checkpoints you trust; convert a trusted copy to safetensors",
            )
        return found

    def persistent_load(self, pid):
        if (
            self._storage_reader is None
            or not isinstance(pid, tuple)
            or len(pid) < 5
            or pid[0] != "storage"
            or not isinstance(pid[1], StorageType)
            or not isinstance(pid[2], str)
            or not isinstance(pid[4], int)
            or pid[4] < 0
        ):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid[:5]
        storage = self._storages.get(key)
        if storage is None:
            storage = self._storages[key] = Storage(key, storage_type, numel, self._storage_reader)
        elif storage.storage_type.dtype != storage_type.dtype or storage.numel != numel:
            raise pickle.UnpicklingError(f"storage {key} is described twice, differently")
        return storage


def unwrap_state_dict(obj, where: str, tensor_type) -> dict:
    """The {name: tensor} dict of a loaded checkpoint (accepting one level of {'state_dict': ...}),
    once every key is a string and every value a `tensor_type`."""
    if isinstance(obj, dict) and len(obj) == 1:
        ((key, value),) = obj.items()
        if key in ("state_dict", "model", "module") and isinstance(value, dict):
            obj = value
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where} holds a {type(obj).__name__}, not a state dict", "give a checkpoint of tensors")
    for name, value in obj.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{where} has a non-string key {name!r:.60}", "give a state dict of named tensors")
        if not isinstance(value, tensor_type):
            raise CheckpointError(
                f"{where}: '{name}' is a {type(value).__name__}, not a tensor", "give a state dict of tensors"
            )
    return obj


class _ZipStorageReader:
    """Reads storages of a torch zip archive, memory-mapping uncompressed members."""

    def __init__(self, path: Path, archive: zipfile.ZipFile, prefix: str, big_endian: bool):
        self.path = path
        self.archive = archive
        self.prefix = prefix
        self.big_endian = big_endian

    def __call__(self, storage: Storage) -> np.ndarray:
        try:
            return self._read(storage)
        except CheckpointError:
            raise
        except Exception as e:  # a damaged archive (zip headers, compressed data)
            raise CheckpointError(
                f"{self.path}: cannot read storage '{storage.key}': {type(e).__name__}: {e}"[:400], "re-download the file"
            ) from None

    def _read(self, storage: Storage) -> np.ndarray:
        member = f"{self.prefix}data/{storage.key}"
        try:
            info = self.archive.getinfo(member)
        except KeyError:
            raise CheckpointError(
                f"{self.path}: storage '{storage.key}' is missing from the archive", "re-download the file"
            ) from None
        dtype = np.dtype(storage.storage_type.numpy_dtype)
        if self.big_endian:
            dtype = dtype.newbyteorder(">")
        needed = storage.numel * dtype.itemsize
        if info.file_size < needed:
            raise CheckpointError(
                f"{self.path}: storage '{storage.key}' holds {info.file_size} bytes, {needed} expected",
                "the file is damaged; re-download it",
            )
        if info.compress_type == zipfile.ZIP_STORED:
            with open(self.path, "rb") as f:
                f.seek(info.header_offset)
                header = f.read(ZIP_LOCAL_HEADER.size)
            fields = ZIP_LOCAL_HEADER.unpack(header)
            if fields[0] != b"PK\x03\x04":
                raise CheckpointError(f"{self.path}: damaged zip member {member}", "re-download the file")
            data_offset = info.header_offset + ZIP_LOCAL_HEADER.size + fields[-2] + fields[-1]
            if data_offset + needed > self.path.stat().st_size:
                raise CheckpointError(
                    f"{self.path} is truncated (storage '{storage.key}' ends past the file)", "re-download the file"
                )
            array = np.memmap(self.path, dtype=dtype, mode="r", offset=data_offset, shape=(storage.numel,))
        else:
            with self.archive.open(member) as f:  # no more than the storage holds (a zip bomb holds more)
                array = np.frombuffer(f.read(needed), dtype=dtype)
        return array.astype(dtype.newbyteorder("<")) if self.big_endian else array


def load_torch_zip(path: Path) -> dict[str, PickledTensor]:
    """The tensors of a torch zip checkpoint, read by the restricted unpickler (torch not needed)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        _refuse_non_zip(path)
    try:
        state = unwrap_state_dict(_load_zip_pickle(path), str(path), PickledTensor)
    except CheckpointError:
        raise
    except Exception as e:  # nothing here runs the file's code: any other error is a damaged file
        raise CheckpointError(
            f"cannot read {path}: {type(e).__name__}: {e}"[:400], "the file is damaged or not a state dict"
        ) from None
    return dict(state)


def _load_zip_pickle(path: Path):
    """The object a torch zip archive's data.pkl holds, its storages bound to the archive's members."""
    archive = zipfile.ZipFile(path)
    pickles = [name for name in archive.namelist() if name.endswith("data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        raise CheckpointError(
            f"{path} is a zip file but not a PyTorch checkpoint (no data.pkl)", "give a torch.save file"
        )
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = "little"
    if f"{prefix}byteorder" in archive.namelist():
        byteorder = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
    if byteorder not in ("little", "big"):
        raise CheckpointError(f"{path}: unknown byte order '{byteorder}'", "re-save the checkpoint")
    reader = _ZipStorageReader(path, archive, prefix, byteorder == "big")
    return RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), reader, str(path)).load()


def _refuse_non_zip(path: Path):
    """Explain why a non-zip file cannot be read; its first pickle is read restrictedly, nothing runs."""
    try:
        with open(path, "rb") as f:
            first = RestrictedUnpickler(f, None, str(path)).load()
    except CheckpointError:
        raise
    except Exception:
        raise CheckpointError(f"{path} is not a PyTorch checkpoint", "give a torch.save file or safetensors") from None
    if first == LEGACY_MAGIC:
        raise CheckpointError(
            f"{path} uses PyTorch's legacy (pre-1.6) serialization, which needs torch to read",
            "install torch, or re-save the checkpoint with a recent torch",
        )
    raise CheckpointError(f"{path} is a pickle but not a PyTorch checkpoint", "give a torch.save file or safetensors")
