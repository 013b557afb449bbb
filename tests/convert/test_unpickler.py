"""Our restricted unpickler for PyTorch checkpoints (`cumo_mlx.convert.unpickler`), torch hidden.

It must read what `torch.save` writes (dtypes, views, shared storages, parameters), refuse every
other global and persistent id without running anything, and check each tensor view against its
storage before touching data. torch is used here only to write files and as the yardstick.
"""

import collections
import contextlib
import io
import os
import pickle
import re
import sys
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from cumo_mlx.convert import checkpoint
from cumo_mlx.convert.unpickler import load_torch_zip
from cumo_mlx.errors import CheckpointError


@contextlib.contextmanager
def torch_hidden():
    """`import torch` fails inside the block (files are written with torch before it)."""
    saved = sys.modules.get("torch")
    sys.modules["torch"] = None
    try:
        yield
    finally:
        sys.modules["torch"] = saved


def read_without_torch(path: Path) -> dict:
    with torch_hidden():
        entries = checkpoint.read_pickle(path)
        return {name: (entry.dtype, entry.shape, entry.read()) for name, entry in entries.items()}


def as_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().contiguous()
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def test_reads_what_torch_save_writes(tmp_path):
    base = torch.randn(6, 8)
    state = collections.OrderedDict(
        f32=torch.randn(3, 4),
        f16=torch.randn(5).half(),
        bf16=torch.randn(2, 3).to(torch.bfloat16),
        i64=torch.arange(7),
        flag=torch.tensor([True, False]),
        scalar=torch.tensor(2.5),
        empty=torch.zeros(0, 3),
        transposed=base.t(),  # a strided view of a shared storage
        column=base[:, 3],
        rows=base[2:4],
        param=torch.nn.Parameter(torch.randn(4, 2)),
    )
    state._metadata = {"": {"version": 1}}  # as module.state_dict() sets it
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    got = read_without_torch(path)
    assert list(got) == list(state)
    names = {
        torch.float32: "float32",
        torch.float16: "float16",
        torch.bfloat16: "bfloat16",
        torch.int64: "int64",
        torch.bool: "bool",
    }
    for name, tensor in state.items():
        dtype, shape, data = got[name]
        assert dtype == names[tensor.dtype] and shape == tuple(tensor.shape)
        np.testing.assert_array_equal(data, as_numpy(tensor))
        assert data.flags.c_contiguous
    # As MLX arrays, bfloat16 included.
    with torch_hidden():
        bf16 = checkpoint.read_pickle(path)["bf16"].load()
    assert bf16.dtype == mx.bfloat16
    np.testing.assert_array_equal(np.array(bf16.astype(mx.float32)), state["bf16"].float().numpy())


def test_reads_a_nested_state_dict(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    assert list(read_without_torch(path)) == ["w"]


class _Payload:
    def __init__(self, reduce):
        self.reduce = reduce

    def __reduce__(self):
        return self.reduce


def _zip_with_pickle(path: Path, payload: bytes) -> Path:
    """A torch zip checkpoint whose data.pkl is `payload`."""
    torch.save({"w": torch.zeros(2)}, path.with_suffix(".good"))
    with zipfile.ZipFile(path.with_suffix(".good")) as good, zipfile.ZipFile(path, "w") as out:
        for info in good.infolist():
            out.writestr(info, payload if info.filename.endswith("data.pkl") else good.read(info))
    return path


@pytest.mark.parametrize(
    "make, refused",
    [
        (lambda m: (os.system, (f"touch {m}",)), r"posix\.system"),
        (lambda m: (eval, (f"open({str(m)!r}, 'w')",)), r"builtins\.eval"),  # protocol 2 writes __builtin__
        (lambda m: (exec, (f"open({str(m)!r}, 'w')",)), r"builtins\.exec"),
        (lambda m: (open, (str(m), "w")), r"io\.open"),
        (lambda m: (__import__("subprocess").call, (["touch", str(m)],)), r"subprocess\.call"),
        (lambda m: (collections.Counter, ()), r"collections\.Counter"),
    ],
    ids=["os.system", "eval", "exec", "open", "subprocess", "other-collections-class"],
)
@pytest.mark.parametrize("container", ["zip", "raw"])
def test_refuses_every_other_global_without_running_it(tmp_path, make, refused, container):
    marker = tmp_path / "PWNED"
    payload = pickle.dumps(collections.OrderedDict(w=_Payload(make(marker))), protocol=2)
    path = tmp_path / "evil.bin"
    if container == "zip":
        _zip_with_pickle(path, payload)
    else:
        path.write_bytes(payload)
    with torch_hidden(), pytest.raises(CheckpointError) as info:
        checkpoint.read_pickle(path)
    message = str(info.value)
    assert re.search(f"asks for {refused}, which was refused and not run", message), message
    assert "\n" not in message
    assert not marker.exists()


def test_refuses_globals_at_any_protocol(tmp_path):
    marker = tmp_path / "PWNED"
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"evil{protocol}.bin"
        _zip_with_pickle(path, pickle.dumps({"w": _Payload((os.system, (f"touch {marker}",)))}, protocol=protocol))
        with torch_hidden(), pytest.raises(CheckpointError, match="posix.system"):
            load_torch_zip(path)
    assert not marker.exists()


# Crafted checkpoints: the exact format torch writes, with views and ids we choose.


class _Storage:
    def __init__(self, key, storage_type, numel):
        self.key, self.storage_type, self.numel = key, storage_type, numel


class _View:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class _CraftingPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        if isinstance(obj, tuple) and obj and obj[0] == "raw-pid":
            return obj[1]
        return None

    def reducer_override(self, obj):
        if isinstance(obj, _View):
            args = (obj.storage, obj.offset, obj.size, obj.stride, False, collections.OrderedDict())
            return (torch._utils._rebuild_tensor_v2, args)
        return NotImplemented


def crafted(path: Path, state, storages: dict) -> Path:
    buffer = io.BytesIO()
    _CraftingPickler(buffer, protocol=2).dump(state)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buffer.getvalue())
        z.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")
    return path


def test_crafted_checkpoint_matches_torch(tmp_path):
    data = np.arange(12, dtype=np.float32)
    storage = _Storage("0", torch.FloatStorage, 12)
    state = collections.OrderedDict(a=_View(storage, 0, (3, 4), (4, 1)), b=_View(storage, 1, (2, 3), (1, 4)))
    path = crafted(tmp_path / "ok.bin", state, {"0": data.tobytes()})
    ours = read_without_torch(path)
    theirs = torch.load(path, weights_only=True)
    for name in state:
        np.testing.assert_array_equal(ours[name][2], theirs[name].numpy())


@pytest.mark.parametrize(
    "offset, size, stride",
    [(0, (4, 4), (4, 1)), (10, (3,), (1,)), (0, (3, 4), (5, 1)), (0, (2, 2), (-1, 1)), (-1, (2,), (1,))],
    ids=["too-big", "offset", "stride", "negative-stride", "negative-offset"],
)
def test_views_outside_their_storage_are_refused(tmp_path, offset, size, stride):
    storage = _Storage("0", torch.FloatStorage, 12)
    path = crafted(
        tmp_path / "bad.bin", {"a": _View(storage, offset, size, stride)}, {"0": np.zeros(12, np.float32).tobytes()}
    )
    with torch_hidden(), pytest.raises(CheckpointError, match="cannot read"):
        load_torch_zip(path)


def test_storage_shorter_than_declared_is_refused(tmp_path):
    storage = _Storage("0", torch.FloatStorage, 12)
    path = crafted(
        tmp_path / "short.bin", {"a": _View(storage, 0, (12,), (1,))}, {"0": np.zeros(5, np.float32).tobytes()}
    )
    with torch_hidden():
        tensors = load_torch_zip(path)
        with pytest.raises(CheckpointError, match="holds 20 bytes, 48 expected"):
            tensors["a"].numpy()


def test_unknown_persistent_ids_are_refused(tmp_path):
    path = crafted(tmp_path / "pid.bin", {"a": ("raw-pid", ("module", "os", "system"))}, {})
    with torch_hidden(), pytest.raises(CheckpointError, match="persistent id"):
        load_torch_zip(path)


def test_non_tensor_values_are_refused(tmp_path):
    lists = crafted(tmp_path / "list.bin", {"a": [1, 2, 3]}, {})
    not_dict = crafted(tmp_path / "notdict.bin", [1, 2], {})
    with torch_hidden():
        with pytest.raises(CheckpointError, match="'a' is a list, not a tensor"):
            load_torch_zip(lists)
        with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
            load_torch_zip(not_dict)


def test_legacy_format_and_garbage(tmp_path):
    legacy = tmp_path / "legacy.bin"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00not a pickle at all" * 10)
    other_zip = tmp_path / "other.bin"
    with zipfile.ZipFile(other_zip, "w") as z:
        z.writestr("hello.txt", "hi")
    with torch_hidden():
        with pytest.raises(CheckpointError, match="legacy .* serialization, which needs torch"):
            load_torch_zip(legacy)
        with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
            load_torch_zip(garbage)
        with pytest.raises(CheckpointError, match="no data.pkl"):
            load_torch_zip(other_zip)
    assert list(checkpoint.read_pickle(legacy)) == ["w"]  # torch itself reads it


def test_torch_loader_refuses_too(tmp_path):
    """With torch installed, its weights_only loader is used: the same refusal, nothing runs."""
    marker = tmp_path / "PWNED"
    path = _zip_with_pickle(
        tmp_path / "evil.bin", pickle.dumps({"w": _Payload((os.system, (f"touch {marker}",)))}, protocol=2)
    )
    with pytest.raises(CheckpointError, match="asks for posix.system, which was refused and not run"):
        checkpoint.read_pickle(path)
    assert not marker.exists()
