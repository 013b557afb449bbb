"""Security: no pickle or model code ever runs, files are read and written only where the user said,
image URLs are fenced (http(s) only, a size limit, one timeout for the whole download).

Malicious files run `touch MARKER` (os.system) or write MARKER (exec, open) when they are unpickled
or imported; every test checks MARKER never appears. What a test plants and where:
- pickles (zip and raw, torch's loader and ours) as every weight file name the converter reads
  (*.bin, *.pt, *.pth, a shard of an index), the ones it must skip (training artefacts, .bin beside
  safetensors), a hub snapshot loaded by id, and beside the files the other commands read (model
  directories, training checkpoints, adapters): none of those read pickles at all;
- Python files named by `model_file` / `auto_map` in config.json and tokenizer_config.json, with "y"
  on standard input (transformers asks there when trust_remote_code is not given);
- dataset image paths and index entries that leave their folder; every writing command run in a
  sandbox whose only change must be the output path named.
The source is also scanned: no unpickling, eval/exec, yaml.load or trust_remote_code outside the
two audited readers.
"""

import ast
import contextlib
import http.server
import io
import json
import os
import pickle
import shutil
import signal
import socketserver
import subprocess
import sys
import threading
import time
import tracemalloc
import zipfile
from pathlib import Path

import cumo_mlx
import pytest
import torch
from cli_util import assert_one_error_line, run_cli
from click.testing import CliRunner
from cumo_mlx import hub, paths, processor
from cumo_mlx.cli.main import main as cli_main
from cumo_mlx.cli.train import load_config_file
from cumo_mlx.convert import checkpoint
from cumo_mlx.errors import CheckpointError, CuMoError, ImageError
from cumo_mlx.models.config import load_config
from cumo_mlx.train.data import BadSample, check_sample, read_records
from cumo_mlx.train.trainer import TrainConfig, Trainer
from PIL import Image
from safetensors.torch import save_file
from tiny_data import instruct_samples, write_dataset, write_images
from tiny_models import tiny_config, write_mlx_model
from torch_reference import build_reference, original_state_dict

CONVERSATION = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]


# ---------------------------------------------------------------------------------------------
# Tiny original checkpoints and malicious files
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def original_state():
    """(config, original-layout state dict) of a tiny CuMo-Mistral (CLIP-MoE, MoE connector)."""
    torch.manual_seed(0)
    config = tiny_config()
    return config, {k: v.contiguous() for k, v in original_state_dict(build_reference(config, seed=0)).items()}


def original_checkpoint(directory: Path, original_state, tokenizer_dir: Path, fmt: str = "safetensors") -> Path:
    """A checkpoint directory as the original ships it (vision config embedded: no tower lookup)."""
    config, state = original_state
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, directory / name)
    if fmt == "safetensors":
        save_file(state, str(directory / "model.safetensors"))
    else:
        torch.save(state, directory / "pytorch_model.bin")
    return directory


class Payload:
    """Unpickling this runs code: `touch MARKER` through os.system, or a write through exec or open."""

    def __init__(self, marker: Path, how: str):
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "system":
            return (os.system, (f"touch {self.marker}",))
        if self.how == "open":
            return (open, (str(self.marker), "w"))
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def rewrite_torch_zip(archive, out, member: str, change, compress_type=None):
    """Copy the torch zip `archive` to `out` (paths or file objects) with the member whose name ends
    in `member` changed to change(its bytes), stored with `compress_type` if given; `out`."""
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(out, "w") as copy:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith(member):
                copy.writestr(info, change(data), compress_type=compress_type)
            else:
                copy.writestr(info, data)
    return out


def evil_pickle(path: Path, marker: Path, how: str = "system", container: str = "zip") -> Path:
    """A file named like a checkpoint whose pickle runs code: raw, or inside a torch zip archive."""
    payload = pickle.dumps({"model.norm.weight": Payload(marker, how)}, protocol=2)
    if container == "raw":
        path.write_bytes(payload)
        return path
    buffer = io.BytesIO()
    torch.save({"model.norm.weight": torch.ones(64)}, buffer)
    return rewrite_torch_zip(buffer, path, "data.pkl", lambda _: payload)


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "planted code ran"


@pytest.fixture(params=["torch", "own"])
def pickle_loader(request, monkeypatch):
    """Both readers of .bin files: torch's weights_only loader, and ours. Call it once the files are written."""

    def choose():
        if request.param == "own":
            monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails: our unpickler reads

    return choose


# ---------------------------------------------------------------------------------------------
# No pickle code runs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("container", ["zip", "raw"])
@pytest.mark.parametrize("name", ["model.pt", "weights.pth", "shard"])
def test_every_weight_file_name_the_converter_reads_is_refused(
    tmp_path, original_state, tiny_mlx_model_dir, marker, pickle_loader, name, container
):
    """pytorch_model.bin itself: tests/test_convert.py::test_malicious_bin_is_refused_and_never_runs."""
    src = original_checkpoint(tmp_path / "src", original_state, tiny_mlx_model_dir, fmt="bin")
    if name == "shard":  # the second shard of a pickle index
        state = torch.load(src / "pytorch_model.bin", weights_only=True)
        (src / "pytorch_model.bin").unlink()
        names = sorted(state)
        torch.save({k: state[k] for k in names[::2]}, src / "pytorch_model-00001-of-00002.bin")
        evil_pickle(src / "pytorch_model-00002-of-00002.bin", marker, "exec", container)
        weight_map = {k: f"pytorch_model-0000{1 + i % 2}-of-00002.bin" for i, k in enumerate(names)}
        (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
        name = "pytorch_model-00002-of-00002.bin"
    else:
        (src / "pytorch_model.bin").unlink()
        evil_pickle(src / name, marker, "system", container)
    pickle_loader()
    code, out, err = run_cli("convert", "--hf-path", src, "--mlx-path", tmp_path / "mlx", "--no-progress")
    line = assert_one_error_line(code, err)
    assert name in line and ("refused and not run" in line or "not a PyTorch checkpoint" in line), line
    assert not (tmp_path / "mlx").exists()


@pytest.mark.parametrize(
    "planted",
    ["training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state_0.pth", "scaler.pt", "pytorch_model.bin"],
)
def test_pickles_the_converter_must_skip_are_never_opened(tmp_path, original_state, tiny_mlx_model_dir, marker, planted):
    """Training artefacts beside the weights, and .bin beside safetensors, are not weights: never read."""
    src = original_checkpoint(tmp_path / "src", original_state, tiny_mlx_model_dir)
    evil_pickle(src / planted, marker)
    assert cli_main(["convert", "--hf-path", str(src), "--mlx-path", str(tmp_path / "mlx"), "--no-progress"]) == 0
    assert cumo_mlx.load(tmp_path / "mlx")[0] is not None


def test_training_artefacts_beside_a_bin_checkpoint_are_never_opened(
    tmp_path, original_state, tiny_mlx_model_dir, marker, pickle_loader
):
    src = original_checkpoint(tmp_path / "src", original_state, tiny_mlx_model_dir, fmt="bin")
    for name in ("training_args.bin", "optimizer.pt", "rng_state.pth"):
        evil_pickle(src / name, marker)
    pickle_loader()
    assert cli_main(["convert", "--hf-path", str(src), "--mlx-path", str(tmp_path / "mlx"), "--no-progress"]) == 0


def test_hub_snapshot_with_a_malicious_bin(tmp_path, original_state, tiny_mlx_model_dir, marker, monkeypatch):
    """`cumo_mlx.load("org/name")` converts a cached hub snapshot: its pickle is refused too."""
    from huggingface_hub import constants

    src = original_checkpoint(tmp_path / "src", original_state, tiny_mlx_model_dir, fmt="bin")
    evil_pickle(src / "pytorch_model.bin", marker, "exec")
    config = json.loads((src / "config.json").read_text())  # the original layout: the tower named, not embedded
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text(json.dumps(config.pop("vision_config")))
    (src / "config.json").write_text(json.dumps({**config, "mm_vision_tower": str(tmp_path / "clip")}))
    repo = tmp_path / "hf" / "models--evil-org--cumo"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(src, repo / "snapshots" / commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("CUMO_MLX_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CheckpointError, match="refused and not run"):
        cumo_mlx.load("evil-org/cumo")
    assert not any((tmp_path / "cache").glob("*/config.json"))


def test_commands_that_read_models_checkpoints_or_adapters_never_read_pickles(tmp_path, tiny_mlx_model_dir, marker):
    """Planted beside everything the other commands read: they load safetensors only."""
    model = tmp_path / "model"
    shutil.copytree(tiny_mlx_model_dir, model)
    for name in ("pytorch_model.bin", "model.pt", "weights.pth", "model.safetensors.bin"):
        evil_pickle(model / name, marker)
    images = write_images(tmp_path / "images")
    data = write_dataset(tmp_path, instruct_samples(images))
    settings = dict(model=str(model), data=str(data), image_folder=str(tmp_path / "images"), output=str(tmp_path / "out"),
                    iters=3, batch_size=2, lora_rank=2, save_every=1, progress=False)  # fmt: skip
    for record in Trainer(TrainConfig(**settings)).steps():  # stopped as if killed after step 2
        if record["step"] == 2:
            break
    for checkpoint in (tmp_path / "out" / "checkpoints").iterdir():
        for name in ("trainable.bin", "optimizer.pt", "rng_state.pth"):
            evil_pickle(checkpoint / name, marker)
    Trainer(TrainConfig(**settings, resume=True)).run()
    for name in ("adapters.bin", "adapters.pt", "adapter_model.bin"):
        evil_pickle(tmp_path / "out" / name, marker)
    assert cli_main(["fuse", "--model", str(model), "--adapter-path", str(tmp_path / "out"), "--mlx-path", str(tmp_path / "fused")]) == 0
    code, _, err = run_cli("generate", "--model", tmp_path / "fused", "--prompt", "hi", "--max-tokens", 2)
    assert code == 0, err


# The only places allowed to deserialise weights from pickles, and how.
AUDITED = {"convert/checkpoint.py", "convert/unpickler.py"}


def source_files() -> dict:
    """{package-relative name: path} of every module of cumo_mlx, cumo_mlx.cli and cumo_mlx.convert."""
    import cumo_mlx.cli
    import cumo_mlx.convert

    found = {}
    for package, prefix in ((cumo_mlx, ""), (cumo_mlx.cli, "cli/"), (cumo_mlx.convert, "convert/")):
        root = Path(package.__path__[0])
        for path in root.glob("*.py"):
            found[prefix + path.name] = path
    assert {"loader.py", "cli/main.py", "convert/checkpoint.py"} <= found.keys()
    return found


def calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_source_has_no_unsafe_deserialisation_or_code_execution():
    problems, torch_loads = [], []
    for where, path in sorted(source_files().items()):
        tree = ast.parse(path.read_text())
        for node, name in calls(tree):
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            torch_loads += [where] if name.endswith("torch.load") else []
            if name in ("eval", "exec", "compile", "os.system", "yaml.load", "yaml.unsafe_load", "marshal.loads"):
                problems.append(f"{where}:{node.lineno} calls {name}")
            if name in ("pickle.load", "pickle.loads", "np.load", "numpy.load") and keywords.get("allow_pickle") != "False":
                problems.append(f"{where}:{node.lineno} calls {name}")
            if name.endswith("torch.load") and (where not in AUDITED or keywords.get("weights_only") != "True"):
                problems.append(f"{where}:{node.lineno} calls torch.load without weights_only=True")
            if "trust_remote_code" in keywords and keywords["trust_remote_code"] != "False":
                problems.append(f"{where}:{node.lineno} passes trust_remote_code={keywords['trust_remote_code']}")
            if "shell" in keywords and keywords["shell"] != "False":
                problems.append(f"{where}:{node.lineno} runs a shell")
        false_keys = {  # {"trust_remote_code": False}: the one allowed spelling as a string
            id(key)
            for node in ast.walk(tree)
            if isinstance(node, ast.Dict)
            for key, value in zip(node.keys, node.values)
            if isinstance(value, ast.Constant) and value.value is False
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any("Unpickler" in ast.unparse(b) for b in node.bases):
                if where != "convert/unpickler.py":
                    problems.append(f"{where}:{node.lineno} defines an unpickler")
            if isinstance(node, ast.Constant) and node.value == "trust_remote_code" and id(node) not in false_keys:
                problems.append(f"{where}:{node.lineno} sets trust_remote_code to something other than False")
    assert not problems, "\n".join(problems)
    assert torch_loads == ["convert/checkpoint.py"]  # the scan saw the one audited call


# ---------------------------------------------------------------------------------------------
# No model code runs (trust_remote_code)
# ---------------------------------------------------------------------------------------------


def planted_code(marker: Path) -> str:
    return f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nclass C: pass\nModel = ModelArgs = EvilTokenizer = C\n"


def test_model_file_in_config_is_never_imported(tmp_path, tiny_mlx_model_dir, marker):
    model = tmp_path / "model"
    shutil.copytree(tiny_mlx_model_dir, model)
    (model / "evil.py").write_text(planted_code(marker))
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_file": "evil.py"}))
    code, _, err = run_cli("generate", "--model", model, "--prompt", "hi", "--max-tokens", 2)
    assert "custom module" in assert_one_error_line(code, err)


def test_auto_map_code_is_never_run_even_when_stdin_says_yes(tmp_path, tiny_mlx_model_dir, marker):
    """transformers asks "run the custom code? [y/N]" on stdin unless told: a chat's first line must not answer."""
    model = tmp_path / "model"
    shutil.copytree(tiny_mlx_model_dir, model)
    for name in ("evil_tokenizer.py", "evil_config.py", "evil_model.py"):
        (model / name).write_text(planted_code(marker))
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil_config.C", "AutoModelForCausalLM": "evil_model.C"}
    (model / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", None]}
    (model / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    with CliRunner().isolation(input="y\ny\n") as (stdout, stderr, _):
        code = cli_main(["chat", "--model", str(model), "--max-tokens", "2", "--temp", "0"])
    err = stderr.getvalue().decode()
    assert code == 0, err
    assert "custom code" not in err and "[y/N]" not in stdout.getvalue().decode() + err
    assert len(stdout.getvalue().decode().splitlines()) == 2  # both lines were answered as questions


# ---------------------------------------------------------------------------------------------
# Reads stay inside the folders named
# ---------------------------------------------------------------------------------------------


ESCAPES = [
    "../decoy.png",
    "../../decoy.png",
    "sub/../../decoy.png",
    "./../decoy.png",
    "sub/./../../images/../decoy.png",
    "{decoy}",  # absolute
    "/etc/passwd",
    "..",
    "/",
    "../images-evil/decoy.png",  # a sibling whose name starts with the folder's
]


@pytest.mark.parametrize("name", ESCAPES)
def test_dataset_image_paths_cannot_leave_the_image_folder(tmp_path, name):
    """(../ and /etc/passwd also in tests/test_data.py, as skipped samples with messages.)"""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    (tmp_path / "images-evil").mkdir()
    for decoy in (tmp_path / "decoy.png", tmp_path / "images-evil" / "decoy.png"):
        Image.new("RGB", (4, 4)).save(decoy)  # a real image: only the path check stops it
    record = {"image": name.format(decoy=tmp_path / "decoy.png"), "conversations": CONVERSATION}
    with pytest.raises(BadSample, match="outside the image folder|not a file name|not found"):
        check_sample(record, 0, folder, "mistral_instruct_system")


@pytest.mark.parametrize("link", ["escape.png", "door/decoy.png", "sub/up/decoy.png"])
def test_a_symlink_in_the_image_folder_that_points_out_is_outside(tmp_path, link):
    """Containment is judged on real paths: a link inside the folder to a file or folder outside is outside
    (train, experts and the server's --allow-local-files all ask `paths.inside`)."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "decoy.png")
    (folder / "escape.png").symlink_to(tmp_path / "decoy.png")
    (folder / "door").symlink_to(tmp_path)
    (folder / "sub" / "up").symlink_to(tmp_path)
    with pytest.raises(BadSample, match="outside the image folder"):
        check_sample({"image": link, "conversations": CONVERSATION}, 0, folder, "mistral_instruct_system")
    (folder / "inner.png").symlink_to(folder / "sub" / "x.png")
    Image.new("RGB", (4, 4)).save(folder / "sub" / "x.png")
    assert check_sample({"image": "inner.png", "conversations": CONVERSATION}, 0, folder, "plain").images


@contextlib.contextmanager
def deadline(seconds: int):
    """A read that blocks (a FIFO with no writer) fails the test instead of hanging it."""

    def expired(*_):
        raise TimeoutError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _model_with_fifo(tmp_path: Path, model: Path, name: str) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    (copy / name).unlink()
    os.mkfifo(copy / name)
    return copy


SPECIAL_FILE_READERS = {  # every place a user's file enters, given a FIFO
    "image": lambda fifo, tmp, model: processor.load_image(fifo),
    "data file": lambda fifo, tmp, model: read_records(fifo),
    "training config": lambda fifo, tmp, model: load_config_file(None, None, str(fifo)),
    "weight file to convert": lambda fifo, tmp, model: checkpoint.read_checkpoint([fifo]),
    "model weights": lambda fifo, tmp, model: cumo_mlx.load(_model_with_fifo(tmp, model, "model.safetensors")),
    "tokenizer file": lambda fifo, tmp, model: cumo_mlx.load(_model_with_fifo(tmp, model, "tokenizer_config.json")),
    "config.json": lambda fifo, tmp, model: load_config(_model_with_fifo(tmp, model, "config.json")),
}


@pytest.mark.parametrize("reader", SPECIAL_FILE_READERS)
def test_a_fifo_is_refused_where_each_file_enters_and_never_opened(tmp_path, tiny_mlx_model_dir, reader):
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with deadline(60), pytest.raises(CuMoError, match="pipe, device or socket|no config.json"):
        SPECIAL_FILE_READERS[reader](fifo, tmp_path, tiny_mlx_model_dir)


@pytest.mark.parametrize("path, fragment", [("", "path is empty"), (" ", "path is empty"), ("/dev/stdin", "pipe, device or socket"),
                                            ("/dev/zero", "pipe, device or socket"), ("/", "is a directory, not an image"),
                                            ("/nowhere/x.png", "No such file"), ("a\0b", "cannot read")])  # fmt: skip
def test_regular_file_names_what_is_wrong(path, fragment):
    with deadline(60), pytest.raises(ImageError, match=fragment):
        paths.regular_file(path, "image", error=ImageError)


def test_regular_file_size_limit(tmp_path):
    (tmp_path / "big.png").write_bytes(b"\0" * (3 << 20))
    assert paths.regular_file(tmp_path / "big.png", "image", 3 << 20) == tmp_path / "big.png"
    with pytest.raises(CuMoError, match="is 3 MB, over the 2 MB limit"):
        paths.regular_file(tmp_path / "big.png", "image", 2 << 20)


@pytest.mark.parametrize("source", ["fifo", "/dev/stdin"])
def test_generate_with_a_special_file_as_image_fails_at_once(tmp_path, tiny_mlx_model_dir, source):
    """A real process: stdin is a pipe nobody writes to, so reading it (or the FIFO) would never end."""
    if source == "fifo":
        os.mkfifo(tmp_path / "fifo")
        source = str(tmp_path / "fifo")
    argv = ["generate", "--model", str(tiny_mlx_model_dir), "--image", source, "--prompt", "What?", "--max-tokens", "2"]
    process = subprocess.Popen([sys.executable, "-c", "from cumo_mlx.cli.main import entry_point; entry_point()", *argv],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 2 and err.strip().splitlines() == [err.strip()] and "pipe, device or socket" in err, err


def test_training_never_opens_an_image_outside_the_folder(tmp_path, tiny_mlx_model_dir, monkeypatch):
    folder = tmp_path / "images"
    names = write_images(folder)
    Image.new("RGB", (4, 4)).save(tmp_path / "decoy.png")
    samples = instruct_samples(names) + [
        {"id": f"escape-{i}", "image": name.format(decoy=tmp_path / "decoy.png"), "conversations": CONVERSATION}
        for i, name in enumerate(ESCAPES)
    ]
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(Path(fp).resolve()) or real_open(fp, *a, **k))
    data = write_dataset(tmp_path, samples)
    code, out, err = run_cli("train", "--model", tiny_mlx_model_dir, "--data", data, "--image-folder", folder,
                             "--output", tmp_path / "out", "--iters", 2, "--batch-size", 3, "--lora-rank", 2, "--no-progress")  # fmt: skip
    assert code == 0, err
    assert f"skipped {len(ESCAPES)} bad sample(s)" in out
    assert opened and all(folder.resolve() in path.parents for path in opened)


@pytest.mark.parametrize("name", ["../outside.safetensors", "{outside}", "sub/../../outside.safetensors", ".."])
def test_checkpoint_index_cannot_name_files_outside_the_checkpoint(tmp_path, original_state, tiny_mlx_model_dir, name):
    src = original_checkpoint(tmp_path / "src", original_state, tiny_mlx_model_dir)
    outside = tmp_path / "outside.safetensors"
    shutil.move(src / "model.safetensors", outside)  # complete weights: only the path check stops them
    weight_map = {k: name.format(outside=outside) for k in original_state[1]}
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (src / "model-00001-of-00001.safetensors").write_bytes(b"")
    code, _, err = run_cli("convert", "--hf-path", src, "--mlx-path", tmp_path / "mlx", "--no-progress")
    assert "names weight files outside the checkpoint directory" in assert_one_error_line(code, err)


@pytest.mark.parametrize("name", ["../x", "org/../../x", "/abs/x", "org/x/y", "./x", "org/..", "", "a/b/../c"])
def test_hub_ids_cannot_be_paths(name):
    assert not hub.is_hub_id(name)


def test_cache_path_of_a_revision_stays_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CUMO_MLX_CACHE", str(tmp_path / "cache"))
    for revision in ("../../../etc", "/abs", "a/../../b", "..", "x\\..\\y"):
        path = hub.converted_path("org/name", revision)
        assert path.parent == tmp_path / "cache" and "/" not in path.name and path.name != ".."


# ---------------------------------------------------------------------------------------------
# Writes stay inside the output path named
# ---------------------------------------------------------------------------------------------


def tree_state(root: Path) -> dict:
    """Every path under root with its size and modification time (directories included)."""
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, original_state, tiny_mlx_model_dir):
    root = tmp_path_factory.mktemp("sandbox")
    inputs = root / "inputs"
    shutil.copytree(tiny_mlx_model_dir, inputs / "moe")
    names = write_images(inputs / "images")
    write_dataset(inputs, instruct_samples(names), "data.json")
    original_checkpoint(inputs / "original", original_state, tiny_mlx_model_dir)
    write_mlx_model(inputs / "dense", tiny_config(clip_smoe=False, connector="mlp2x_gelu"))
    train = [a.format(**{"in": inputs, "out": inputs / "adapters"}) for a in WRITERS["train"]]
    assert cli_main(train) == 0
    (root / "cwd").mkdir()
    return root


WRITERS = {
    "convert": ["convert", "--hf-path", "{in}/original", "--mlx-path", "{out}", "--no-progress"],
    "convert-quantized": ["convert", "--hf-path", "{in}/original", "--mlx-path", "{out}", "-q", "--q-group-size", "32", "--no-progress"],
    "train": ["train", "--model", "{in}/moe", "--data", "{in}/data.json", "--image-folder", "{in}/images", "--output", "{out}",
              "--iters", "2", "--save-every", "1", "--batch-size", "2", "--lora-rank", "2", "--no-progress"],
    "train-full": ["train", "--model", "{in}/moe", "--data", "{in}/data.json", "--image-folder", "{in}/images", "--output", "{out}",
                   "--iters", "1", "--batch-size", "2", "--fine-tune-type", "full", "--stage", "pft", "--no-progress"],
    "upcycle": ["upcycle", "--model", "{in}/dense", "--mlx-path", "{out}", "--num-experts", "2", "--top-k", "1"],
    "fuse": ["fuse", "--model", "{in}/moe", "--adapter-path", "{in}/adapters", "--mlx-path", "{out}"],
    "data shapes": ["data", "shapes", "--out", "{out}", "--count", "3", "--no-progress"],
    "experts": ["experts", "--model", "{in}/moe", "--data", "{in}/data.json", "--image-folder", "{in}/images",
                "--out", "{out}/heatmap.png", "--json", "{out}/routes.json", "--no-progress"],
}  # fmt: skip


@pytest.mark.parametrize("command", WRITERS)
def test_commands_write_only_under_the_output_path(sandbox, command, monkeypatch):
    """Everything in the sandbox (inputs, working directory) is as it was, but the output path (and
    its parents' listings, where it was created): converter and checkpoint temporaries are gone."""
    monkeypatch.chdir(sandbox / "cwd")
    out = sandbox / "outputs" / command.replace(" ", "-")
    if command == "experts":
        out.mkdir(parents=True)
    before = tree_state(sandbox)
    code, _, err = run_cli(*[a.format(**{"in": sandbox / "inputs", "out": out}) for a in WRITERS[command]])
    assert code == 0, err
    after = tree_state(sandbox)
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    prefix = str(out.relative_to(sandbox))
    outside = [p for p in changed if p != prefix and not p.startswith(prefix + os.sep) and not Path(prefix).is_relative_to(p)]
    assert not outside, outside
    assert any(p.startswith(prefix + os.sep) for p in changed)


# ---------------------------------------------------------------------------------------------
# Image URLs: http(s) only, a size limit, one timeout for the whole download
# ---------------------------------------------------------------------------------------------


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (6, 4), (200, 10, 10)).save(buffer, "PNG")
    return buffer.getvalue()


class Handler(http.server.BaseHTTPRequestHandler):
    """/ok: a PNG; /big and /big-unsized: more bytes than allowed (with and without Content-Length);
    /stall: headers, then silence; /drip: a byte at a time, forever; /to-file, /to-ftp: redirects;
    /missing: 404."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path.startswith("/to-"):
            self.send_response(302)
            self.send_header("Location", {"/to-file": "file:///etc/passwd", "/to-ftp": "ftp://127.0.0.1/x.png"}[self.path])
            self.end_headers()
            return
        if self.path == "/missing":
            self.send_error(404)
            return
        if self.path == "/ok":
            body = png_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        if self.path == "/big":
            self.send_header("Content-Length", str(10 * processor.URL_MAX_BYTES))
        self.end_headers()
        try:
            if self.path.startswith("/big"):
                for _ in range(10):
                    self.wfile.write(b"\0" * processor.URL_MAX_BYTES)
            elif self.path == "/stall":
                self.server.release.wait(30)
            elif self.path == "/drip":
                while not self.server.release.wait(0.05):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
        except OSError:  # the client hung up, as it should
            pass


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr(processor, "URL_MAX_BYTES", 4096)
    monkeypatch.setattr(processor, "URL_TIMEOUT_S", 1.0)
    httpd = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.release = threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.release.set()
    httpd.shutdown()
    httpd.server_close()


def test_url_image_is_read(server):
    assert processor.load_image(f"{server}/ok").size == (6, 4)


@pytest.mark.parametrize(
    "path, message",
    [
        ("/big", "larger than"),
        ("/big-unsized", "larger than"),
        ("/stall", "timed out"),
        ("/drip", "took over"),
        ("/to-file", "is not allowed"),  # urllib's own refusal
        ("/to-ftp", r"not http\(s\)"),  # ours: urllib would follow it
        ("/missing", "cannot download"),
    ],
)
def test_url_limits(server, path, message):
    started = time.monotonic()
    with pytest.raises(ImageError, match=message):
        processor.load_image(f"{server}{path}")
    assert time.monotonic() - started < 15  # the 1 s limit, not the server, ended it


@pytest.mark.parametrize(
    "source", ["file:///etc/passwd", "FILE:///etc/passwd", "ftp://127.0.0.1/x.png", "gopher://x/y", "jar:file:///x!/y"]
)
def test_only_http_urls_are_fetched(source):
    with pytest.raises(ImageError, match="unsupported image URL scheme"):
        processor.load_image(source)


def test_a_bad_url_in_generate_is_one_error_line(server, tiny_mlx_model_dir):
    code, out, err = run_cli("generate", "--model", tiny_mlx_model_dir, "--image", f"{server}/big", "--prompt", "hi")
    assert "larger than" in assert_one_error_line(code, err) and out == ""


# ---------------------------------------------------------------------------------------------
# Memory bombs in weight files (decompression bombs in images: tests/test_processor.py)
# ---------------------------------------------------------------------------------------------


def test_a_broadcast_tensor_view_is_refused_by_both_loaders(tmp_path, monkeypatch):
    """One stored float viewed as 10**12 of them (stride 0): reading it would allocate 4 TB."""
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(1).expand(10**6, 10**6)}, path)
    with pytest.raises(CheckpointError, match="more elements than its storage"):
        checkpoint.read_pickle(path)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(CheckpointError, match="more elements than its storage"):
        checkpoint.read_pickle(path)


def test_a_compressed_storage_is_read_no_further_than_it_is_declared(tmp_path, monkeypatch):
    """A deflated member that inflates to far more than its tensor needs (a zip bomb) is not inflated."""
    good = io.BytesIO()
    torch.save({"w": torch.arange(4.0)}, good)
    path = rewrite_torch_zip(
        good, tmp_path / "pytorch_model.bin", "data/0", lambda data: data + b"\0" * (200 << 20), zipfile.ZIP_DEFLATED
    )
    assert path.stat().st_size < 1 << 20
    monkeypatch.setitem(sys.modules, "torch", None)
    tracemalloc.start()
    try:
        (entry,) = checkpoint.read_pickle(path).values()
        assert entry.read().tolist() == [0.0, 1.0, 2.0, 3.0]
        assert tracemalloc.get_traced_memory()[1] < 20 << 20  # the peak: not the 200 MB inflated
    finally:
        tracemalloc.stop()
