"""`cumo-mlx convert`: original-layout checkpoints (from the independent PyTorch reference) to MLX.

- Parity: tiny checkpoints in the exact original layout (tests/torch_reference.original_state_dict)
  saved as safetensors, sharded safetensors (+ index, experts split across shards), .bin (torch's
  weights_only loader, and our restricted unpickler with torch hidden) and sharded .bin; dense and
  MoE CLIP, both connectors, Mistral and Mixtral; converted float32 logits equal the reference's.
- bfloat16 checkpoints; output layout (embedded vision config, tokenizer, model card, shards,
  index); the original's config.json has no vision config: `mm_vision_tower` points at a tiny CLIP
  directory (transformers format) beside the checkpoint, by relative path, or --vision-tower.
- Quantization: bytes on disk exactly as planned, routers / vision / non-divisible layers kept
  float, loads and runs, logits close (max and mean differences printed).
- Safety: malicious pickles refused by both loaders, nothing they ask for runs.
- Failures: one `error:` line, exit 2, no traceback, DST untouched; atomic writing, --force, and a
  conversion killed mid-write leaves no DST.
- Hub ids: converted once into the cache (from an offline Hugging Face cache), then reused;
  offline with nothing cached is a clear error.
"""

import importlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from cumo_mlx.cli.main import main as cli_main
from cumo_mlx.convert import checkpoint as checkpoint_module
from cumo_mlx.convert import convert as convert_module
from cumo_mlx.convert.convert import convert
from mlx.utils import tree_flatten
from safetensors import safe_open
from safetensors.torch import save_file
from test_security import evil_pickle
from tiny_models import TINY_VISION, tiny_config, write_tokenizer
from torch_reference import (
    build_reference,
    load_original_state_dict,
    original_state_dict,
)

import cumo_mlx
from cumo_mlx.errors import CuMoError
from cumo_mlx.models.config import ModelArgs
from cumo_mlx.models.model import Model, original_name

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-4
IDS = [1, 5, 6, -200, 7, 8, 9, 10]
# (llm, clip_smoe, connector): every kind of each part appears at least once
COMBOS = {
    "mistral-clipmoe-smoe": ("mistral", True, "smoe_mlp"),
    "mistral-dense-mlp2x": ("mistral", False, "mlp2x_gelu"),
    "mixtral-clipmoe-mlp2x": ("mixtral", True, "mlp2x_gelu"),
    "mixtral-dense-smoe": ("mixtral", False, "smoe_mlp"),
}
ALL_MOE = {"mixtral-clipmoe-smoe": ("mixtral", True, "smoe_mlp")}  # all three MoE sites
FORMATS = ("safetensors", "sharded", "bin", "bin-no-torch", "sharded-bin")


# ---------------------------------------------------------------------------------------------
# Building original-layout checkpoints


def write_tiny_clip(directory: Path) -> Path:
    """A CLIP vision tower directory as transformers writes it (config + image processor)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    directory.mkdir(parents=True, exist_ok=True)
    fields = {k: v for k, v in TINY_VISION.items() if k not in ("shortest_edge", "crop_size")}
    CLIPVisionConfig(**fields).save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(directory)
    return directory


def save_state_dict(state: dict, directory: Path, fmt: str) -> None:
    """Weights in one of the layouts published checkpoints use."""
    state = {k: v.contiguous() for k, v in state.items()}
    if fmt == "safetensors":
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    elif fmt in ("bin", "bin-no-torch"):
        torch.save(state, directory / "pytorch_model.bin")
    elif fmt in ("sharded", "sharded-bin"):
        # Round-robin over 3 shards: the experts of every MoE block end up in different files.
        names = sorted(state)
        suffix = "safetensors" if fmt == "sharded" else "bin"
        prefix = "model" if fmt == "sharded" else "pytorch_model"
        files = [f"{prefix}-{i + 1:05d}-of-00003.{suffix}" for i in range(3)]
        weight_map = {name: files[i % 3] for i, name in enumerate(names)}
        for file in files:
            part = {n: state[n] for n in names if weight_map[n] == file}
            if fmt == "sharded":
                save_file(part, str(directory / file), metadata={"format": "pt"})
            else:
                torch.save(part, directory / file)
        index = "model.safetensors.index.json" if fmt == "sharded" else "pytorch_model.bin.index.json"
        (directory / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        raise ValueError(fmt)


def write_checkpoint(directory: Path, state: dict, config: dict, fmt: str = "safetensors") -> Path:
    """An original CuMo checkpoint directory: config.json without vision config, tokenizer, weights."""
    directory.mkdir(parents=True, exist_ok=True)
    original = {k: v for k, v in config.items() if k != "vision_config"}
    (directory / "config.json").write_text(json.dumps(original, indent=2))
    write_tokenizer(directory)
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    write_tiny_clip(directory / original["mm_vision_tower"])
    save_state_dict(state, directory, fmt)
    return directory


_REFERENCES = {}


def reference(combo: str):
    """(config, torch reference, its original state dict), built once per combo."""
    if combo not in _REFERENCES:
        llm, clip_smoe, connector = COMBOS.get(combo) or ALL_MOE[combo]
        config = tiny_config(llm=llm, clip_smoe=clip_smoe, connector=connector)
        model = build_reference(config, seed=3)
        _REFERENCES[combo] = (config, model, original_state_dict(model))
    return _REFERENCES[combo]


def pixels(seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


_LOGITS = {}


@torch.no_grad()
def reference_logits(model) -> np.ndarray:
    if id(model) not in _LOGITS:  # the references built once per combo are reused: so are their logits
        _LOGITS[id(model)] = (model, model(IDS, pixels()).logits.numpy())
    return _LOGITS[id(model)][1]


def mlx_logits(model) -> np.ndarray:
    out = model(IDS, mx.array(pixels().permute(0, 2, 3, 1).numpy()))
    return np.array(out.astype(mx.float32))


def run_cli(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli_main(["convert", "--no-progress", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code: int, err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def snapshot(directory: Path) -> dict:
    """Every file under a directory (and siblings' names) with its bytes, to prove nothing changed."""
    if not directory.exists():
        return {"siblings": sorted(p.name for p in directory.parent.iterdir()) if directory.parent.exists() else []}
    files = {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}
    return {"files": files, "siblings": sorted(p.name for p in directory.parent.iterdir())}


# ---------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("combo", list(COMBOS))
def test_converted_logits_equal_reference(tmp_path, combo, fmt, monkeypatch):
    config, ref, state = reference(combo)
    src = write_checkpoint(tmp_path / "src", state, config, "bin" if fmt == "bin-no-torch" else fmt)
    own_loads = []
    if fmt == "bin-no-torch":
        monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails: our own unpickler reads it
        with pytest.raises(ImportError):
            importlib.import_module("torch")
        real = checkpoint_module.load_torch_zip
        monkeypatch.setattr(checkpoint_module, "load_torch_zip", lambda path: own_loads.append(path) or real(path))
    convert(str(src), str(tmp_path / "mlx"), dtype="float32", progress=False)
    monkeypatch.undo()
    assert len(own_loads) == (1 if fmt == "bin-no-torch" else 0)
    model, _ = cumo_mlx.load(tmp_path / "mlx")
    expected = reference_logits(ref)
    got = mlx_logits(model)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_output_directory_is_complete_and_self_contained(tmp_path, capsys):
    config, ref, state = reference("mistral-clipmoe-smoe")
    src = write_checkpoint(tmp_path / "src", state, config)
    dst = tmp_path / "mlx"
    code, out, err = run_cli(["--hf-path", src, "--mlx-path", dst, "--dtype", "float32"], capsys)
    assert code == 0, err
    assert "parameters" in out and "written" in out and "bits per weight" in out
    names = {p.name for p in dst.iterdir()}
    assert {"config.json", "model.safetensors", "model.safetensors.index.json", "README.md"} <= names
    assert {"tokenizer.model", "tokenizer_config.json", "generation_config.json"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    written = json.loads((dst / "config.json").read_text())
    assert written["vision_config"]["hidden_size"] == TINY_VISION["hidden_size"]
    assert written["vision_config"]["image_size"] == 16 and written["vision_config"]["crop_size"] == 16
    assert "quantization" not in written
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    with safe_open(str(dst / "model.safetensors"), "numpy") as f:
        assert set(f.keys()) == set(index["weight_map"]) and f.metadata() == {"format": "mlx"}
    card = (dst / "README.md").read_text()
    assert "license: cc-by-nc-4.0" in card and "cumo-mlx convert" in card and "cumo_mlx.load" in card
    # No hub and no vision tower directory needed any more.
    shutil.rmtree(src)
    model, processor = cumo_mlx.load(dst)
    np.testing.assert_allclose(mlx_logits(model), reference_logits(ref), atol=TOL, rtol=0)
    assert processor is not None


@pytest.mark.parametrize("fmt", ["safetensors", "bin-no-torch"])
def test_bfloat16_checkpoint(tmp_path, fmt, monkeypatch):
    config, _, state = reference("mixtral-clipmoe-mlp2x")
    bf16 = {k: v.to(torch.bfloat16) for k, v in state.items()}
    config = dict(config, torch_dtype="bfloat16")
    src = write_checkpoint(tmp_path / "src", bf16, config, "bin" if fmt == "bin-no-torch" else fmt)
    if fmt == "bin-no-torch":
        monkeypatch.setitem(sys.modules, "torch", None)
    convert(str(src), str(tmp_path / "bf16"), progress=False)  # default dtype: config's torch_dtype
    convert(str(src), str(tmp_path / "f32"), dtype="float32", progress=False)
    monkeypatch.undo()
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    rounded = build_reference(config, seed=0)
    load_original_state_dict(rounded, {k: v.float() for k, v in bf16.items()})
    model, _ = cumo_mlx.load(tmp_path / "f32")
    np.testing.assert_allclose(mlx_logits(model), reference_logits(rounded), atol=TOL, rtol=0)


def test_output_shards_stay_under_the_limit(tmp_path, monkeypatch):
    config, ref, state = reference("mixtral-dense-smoe")
    src = write_checkpoint(tmp_path / "src", state, config)
    monkeypatch.setattr(convert_module, "MAX_SHARD_BYTES", 200_000)
    convert(str(src), str(tmp_path / "mlx"), dtype="float32", progress=False)
    shards = sorted((tmp_path / "mlx").glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "mlx" / "model.safetensors.index.json").read_text())
    for shard in shards:
        with safe_open(str(shard), "numpy") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        assert all(index["weight_map"][k] == shard.name for k in tensors)
        big = max(v.nbytes for v in tensors.values())
        assert sum(v.nbytes for v in tensors.values()) <= max(200_000, big)
    model, _ = cumo_mlx.load(tmp_path / "mlx")
    np.testing.assert_allclose(mlx_logits(model), reference_logits(ref), atol=TOL, rtol=0)


@pytest.mark.parametrize("combo", [*COMBOS, *ALL_MOE])
def test_original_names_invert_sanitize(combo):
    """`original_name` (what "missing from the checkpoint" names) gives every parameter the name the
    original checkpoint stores it under, `*` for the expert index."""
    config, _, state = reference(combo)
    stored = {re.sub(r"\.experts\.\d+\.", ".experts.*.", name) for name in state}
    ours = [name for name, _ in tree_flatten(Model(ModelArgs.from_dict(config)).parameters())]
    names = {name: original_name(name) for name in ours}
    assert set(names.values()) <= stored, sorted(set(names.values()) - stored)
    assert len(set(names.values())) == len(ours) and not [n for n in ours if names[n] == n]


def test_vision_tower_override(tmp_path, capsys):
    """The published config names the hub CLIP-L; our tiny weights need --vision-tower."""
    config, ref, state = reference("mistral-clipmoe-smoe")
    src = write_checkpoint(tmp_path / "src", state, config)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(cfg, mm_vision_tower="openai/clip-vit-large-patch14-336")))
    code, _, err = run_cli(["--hf-path", src, "--mlx-path", tmp_path / "a", "--dtype", "float32"], capsys)
    assert_one_error_line(code, err, "differs from the vision tower width 1024", "mm_vision_tower")
    assert not (tmp_path / "a").exists()
    # A relative --vision-tower resolves against the checkpoint directory.
    code, _, err = run_cli(
        ["--hf-path", src, "--mlx-path", tmp_path / "b", "--dtype", "float32", "--vision-tower", "tiny-clip"], capsys
    )
    assert code == 0, err
    model, _ = cumo_mlx.load(tmp_path / "b")
    np.testing.assert_allclose(mlx_logits(model), reference_logits(ref), atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# Quantization


def quantized_bytes(shape, bits: int, group: int, scale_bytes: int) -> int:
    *lead, inputs = shape
    rows = int(np.prod(lead))
    return rows * inputs * bits // 8 + 2 * rows * (inputs // group) * scale_bytes


@pytest.mark.parametrize("bits,group", [(4, 64), (8, 32), (3, 32)])
def test_quantized_conversion(tmp_path, bits, group):
    config, ref, state = reference("mixtral-clipmoe-smoe")
    src = write_checkpoint(tmp_path / "src", state, config)
    float_summary = convert(str(src), str(tmp_path / "f16"), dtype="float16", progress=False)
    summary = convert(
        str(src), str(tmp_path / "q"), quantize=True, q_bits=bits, q_group_size=group, dtype="float16", progress=False
    )
    written = json.loads((tmp_path / "q" / "config.json").read_text())
    quant = written["quantization"]
    assert quant["bits"] == bits and quant["group_size"] == group and written["quantization_config"] == quant

    # Bytes on disk: exactly the float model with each quantized weight replaced by its packed form.
    with safe_open(str(tmp_path / "f16" / "model.safetensors"), "numpy") as f:
        float_shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "numpy") as f:
        q_keys = set(f.keys())
    quantized_modules = {k[: -len(".scales")] for k in q_keys if k.endswith(".scales")}
    expected = 0
    for name, shape in float_shapes.items():
        module = name.rpartition(".")[0]
        if module in quantized_modules and name.endswith(".weight"):
            vision = module.startswith(("vision_tower.", "mm_projector."))
            expected += quantized_bytes(shape, 8 if vision else bits, group, 2)
        else:
            expected += int(np.prod(shape)) * 2
    assert summary.tensor_bytes == expected < float_summary.tensor_bytes
    index = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == expected
    assert summary.parameters == float_summary.parameters
    assert abs(summary.bits_per_weight - expected * 8 / summary.parameters) < 1e-9

    # What is quantized: the LLM (linears, embedding, lm_head, stacked experts) where divisible.
    llm = "language_model.model.layers.0"
    for module in (
        f"{llm}.self_attn.q_proj",
        f"{llm}.block_sparse_moe.experts.gate_proj",
        "language_model.lm_head",
        "language_model.model.embed_tokens",
    ):
        assert module in quantized_modules
    # down_proj's input (intermediate 96) splits into groups of 32, not 64.
    assert (f"{llm}.block_sparse_moe.experts.down_proj" in quantized_modules) == (96 % group == 0)
    if 96 % group:
        assert quant[f"{llm}.block_sparse_moe.experts.down_proj"] is False
    # Never quantized: routers of all three MoE sites.
    routers = [
        f"{llm}.block_sparse_moe.gate",
        "mm_projector.gate",
        "vision_tower.vision_model.encoder.layers.0.mlp.gate",
    ]
    for router in routers:
        assert router not in quantized_modules and quant[router] is False
    # The vision tower and the connector at 8 bits by default, recorded per layer where that differs.
    vision_layers = [m for m in quantized_modules if m.startswith(("vision_tower.", "mm_projector."))]
    assert "mm_projector.experts.fc1" in vision_layers
    assert "vision_tower.vision_model.encoder.layers.0.mlp.experts.fc2" in vision_layers
    for layer in vision_layers:
        assert quant.get(layer) == (None if bits == 8 else {"group_size": group, "bits": 8, "mode": "affine"})

    model, _ = cumo_mlx.load(tmp_path / "q")
    modules = dict(model.named_modules())
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    assert {modules[layer].bits for layer in vision_layers} == {8}
    assert modules[f"{llm}.self_attn.q_proj"].bits == bits

    assert isinstance(modules[f"{llm}.block_sparse_moe.experts.gate_proj"], QuantizedSwitchLinear)
    assert isinstance(modules[f"{llm}.self_attn.q_proj"], nn.QuantizedLinear)
    for router in routers:
        assert type(modules[router]) is nn.Linear
    expected_logits = reference_logits(ref)
    got = mlx_logits(model)
    diff = np.abs(got - expected_logits)
    print(
        f"\n{bits}-bit group {group}: max |logit diff| {diff.max():.4f}, mean {diff.mean():.4f} "
        f"(mean |logit| {np.abs(expected_logits).mean():.3f})"
    )
    assert np.isfinite(got).all()
    # Tiny random models are harsh on low bits (4-bit group 64 is one group per 64-wide row); float16
    # alone gives max 0.008 / mean 0.001 here. Observed: 8-bit 0.08 / 0.013, 4-bit 1.6 / 0.23, 3-bit 2.8 / 0.43.
    max_bound, mean_bound, agree = {8: (0.25, 0.04, 0.9), 4: (4.0, 0.5, 0.4), 3: (6.0, 1.0, 0.0)}[bits]
    assert diff.max() < max_bound and diff.mean() < mean_bound
    assert (got.argmax(-1) == expected_logits.argmax(-1)).mean() >= agree


def test_quantize_vision(tmp_path):
    config, ref, state = reference("mistral-clipmoe-smoe")
    src = write_checkpoint(tmp_path / "src", state, config)
    convert(
        str(src), str(tmp_path / "q"), quantize=True, q_bits=8, q_group_size=32, quantize_vision=True, progress=False
    )
    quant = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    model, _ = cumo_mlx.load(tmp_path / "q")
    modules = dict(model.named_modules())
    layer = "vision_tower.vision_model.encoder.layers.0"
    assert isinstance(modules[f"{layer}.self_attn.q_proj"], nn.QuantizedLinear)
    assert modules[f"{layer}.mlp.experts.fc1"].__class__.__name__ == "QuantizedSwitchLinear"
    assert modules["mm_projector.experts.fc1"].__class__.__name__ == "QuantizedSwitchLinear"
    for router in (f"{layer}.mlp.gate", "mm_projector.gate", "language_model.model.layers.0.mlp.gate_proj"):
        expected_type = nn.Linear if router.endswith(".gate") else nn.QuantizedLinear
        assert type(modules[router]) is expected_type
    assert type(modules["vision_tower.vision_model.embeddings.position_embedding"]) is nn.Embedding
    assert quant["vision_tower.vision_model.embeddings.position_embedding"] is False
    diff = np.abs(mlx_logits(model) - reference_logits(ref))
    print(f"\n8-bit, vision quantized too: max |logit diff| {diff.max():.4f}, mean {diff.mean():.4f}")
    assert diff.max() < 0.5 and diff.mean() < 0.08  # observed 0.23 / 0.024


@pytest.mark.parametrize(
    "flags,bits",
    [([], 8), (["--vision-bits", "4"], 4), (["--vision-bits", "6", "--quantize-vision"], 6), (["--no-quantize-vision"], None)],
)
def test_vision_bits(tmp_path, capsys, flags, bits):
    config, ref, state = reference("mistral-clipmoe-smoe")
    src = write_checkpoint(tmp_path / "src", state, config)
    code, out, err = run_cli(["--hf-path", src, "--mlx-path", tmp_path / "q", "-q", "--q-group-size", "32", *flags], capsys)
    assert code == 0, err
    assert f"vision {bits}-bit" in out if bits else "vision float32" in out, out
    model, _ = cumo_mlx.load(tmp_path / "q")
    modules = dict(model.named_modules())
    for layer in ("vision_tower.vision_model.encoder.layers.1.mlp.experts.fc2", "mm_projector.experts.fc1"):
        assert getattr(modules[layer], "bits", None) == bits
    assert modules["language_model.model.layers.0.self_attn.q_proj"].bits == 4
    card = (tmp_path / "q" / "README.md").read_text()
    assert (f"--vision-bits {bits}" if bits else "--no-quantize-vision") in card


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--quantize-vision"], "--quantize-vision needs --quantize"),
        (["--no-quantize-vision"], "--no-quantize-vision needs --quantize"),
        (["--vision-bits", "4"], "--vision-bits has no effect without --quantize"),
        (["-q", "--vision-bits", "4", "--no-quantize-vision"], "--vision-bits has no effect with --no-quantize-vision"),
    ],
)
def test_vision_quantization_flags_that_would_be_ignored(tmp_path, capsys, flags, message):
    code, _, err = run_cli(["--hf-path", tmp_path, "--mlx-path", tmp_path / "x", *flags], capsys)
    assert_one_error_line(code, err, message)


# ---------------------------------------------------------------------------------------------
# Malicious pickles


@pytest.mark.parametrize("loader", ["torch", "own"])
@pytest.mark.parametrize("how", ["system", "open"])
@pytest.mark.parametrize("container", ["zip", "raw"])
def test_malicious_bin_is_refused_and_never_runs(tmp_path, capsys, monkeypatch, loader, how, container):
    config, _, state = reference("mistral-clipmoe-smoe")
    src = write_checkpoint(tmp_path / "src", state, config, "bin")
    marker = tmp_path / "PWNED"
    evil_pickle(src / "pytorch_model.bin", marker, how, container)
    if loader == "own":
        monkeypatch.setitem(sys.modules, "torch", None)
    code, _, err = run_cli(["--hf-path", src, "--mlx-path", tmp_path / "mlx"], capsys)
    monkeypatch.undo()
    expected = "posix.system" if how == "system" else "io.open"
    assert_one_error_line(code, err, "pytorch_model.bin is not plain tensor data", expected, "refused and not run")
    assert not marker.exists()
    assert not (tmp_path / "mlx").exists()


# ---------------------------------------------------------------------------------------------
# Failures: one line, exit 2, DST untouched


def _broken(kind: str, src: Path, state: dict) -> tuple[str, ...]:
    """Damage the checkpoint in `src`; the fragments the error line must contain."""
    state = dict(state)
    if kind == "missing key":
        del state["model.layers.1.self_attn.q_proj.weight"]
        save_state_dict(state, src, "safetensors")
        return ("missing from the checkpoint", "model.layers.1.self_attn.q_proj.weight")
    if kind == "missing expert":
        del state["model.mm_projector.experts.2.0.weight"]
        save_state_dict(state, src, "safetensors")
        return ("experts [2]", "mm_projector")
    if kind == "extra key":
        state["model.layers.0.self_attn.extra_proj.weight"] = torch.zeros(4, 4)
        save_state_dict(state, src, "safetensors")
        return ("not part of the configured model", "model.layers.0.self_attn.extra_proj.weight")
    if kind == "wrong shape":
        state["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 95)
        save_state_dict(state, src, "safetensors")
        return ("wrong shapes", "model.layers.0.mlp.down_proj.weight is 64x95", "64x96")
    if kind == "truncated safetensors":
        path = src / "model.safetensors"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return ("model.safetensors is truncated",)
    if kind == "truncated bin":
        (src / "model.safetensors").unlink()
        torch.save(state, src / "pytorch_model.bin")
        path = src / "pytorch_model.bin"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return ("pytorch_model.bin",)
    if kind == "missing shard":
        (src / "model.safetensors").unlink()
        save_state_dict(state, src, "sharded")
        (src / "model-00002-of-00003.safetensors").unlink()
        return ("missing the weight files model-00002-of-00003.safetensors",)
    if kind == "empty directory":
        shutil.rmtree(src)
        src.mkdir()
        return ("no config.json",)
    if kind == "no weights":
        (src / "model.safetensors").unlink()
        return ("no weights in",)
    if kind == "overlapping tensors":  # the second tensor's offsets moved onto the first's bytes
        path = src / "model.safetensors"
        data = path.read_bytes()
        n = int.from_bytes(data[:8], "little")
        entries = json.loads(data[8 : 8 + n])
        first, second = [name for name in entries if name != "__metadata__"][:2]
        begin, end = entries[second]["data_offsets"]
        start = entries[first]["data_offsets"][0]
        entries[second]["data_offsets"] = [start, start + end - begin]
        blob = json.dumps(entries, separators=(",", ":")).encode()
        assert len(blob) <= n  # the same header length: the offsets still count from the same byte
        path.write_bytes(data[:8] + blob.ljust(n) + data[8 + n :])
        return ("overlap", first, second)
    raise ValueError(kind)


FAILURES = [
    "missing key",
    "missing expert",
    "extra key",
    "wrong shape",
    "truncated safetensors",
    "truncated bin",
    "missing shard",
    "empty directory",
    "no weights",
    "overlapping tensors",
]


@pytest.mark.parametrize("existing", [False, True], ids=["new-dst", "force-over-existing"])
@pytest.mark.parametrize("kind", FAILURES)
def test_failure_is_one_clear_line_and_dst_untouched(tmp_path, capsys, kind, existing):
    config, _, state = reference("mistral-clipmoe-smoe")
    src = write_checkpoint(tmp_path / "src", state, config)
    fragments = _broken(kind, src, state)
    dst = tmp_path / "out" / "mlx"
    extra = []
    if existing:
        dst.mkdir(parents=True)
        (dst / "keep.txt").write_text("an older conversion")
        extra = ["--force"]
    before = snapshot(dst)
    code, out, err = run_cli(["--hf-path", src, "--mlx-path", dst, *extra], capsys)
    assert_one_error_line(code, err, *fragments)
    assert snapshot(dst) == before


def test_failures_through_the_console_script(tmp_path):
    """A real process: no traceback on stderr, exit 2 (truncated file, and an unknown hub id offline)."""
    config, _, state = reference("mistral-clipmoe-smoe")
    src = write_checkpoint(tmp_path / "src", state, config)
    path = src / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), CUMO_MLX_CACHE=str(tmp_path / "cache"))
    env.pop("HF_HUB_CACHE", None)
    for source, fragment in ((src, "truncated"), ("nobody-here/no-such-cumo", "not in the local Hugging Face cache")):
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                "from cumo_mlx.cli.main import entry_point; entry_point()",
                "convert",
                "--hf-path",
                str(source),
                "--mlx-path",
                str(tmp_path / "mlx"),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, result.stderr
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
        assert not (tmp_path / "mlx").exists()


def test_existing_destination(tmp_path, capsys):
    config, ref, state = reference("mistral-dense-mlp2x")
    src = write_checkpoint(tmp_path / "src", state, config)
    dst = tmp_path / "mlx"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    code, _, err = run_cli(["--hf-path", src, "--mlx-path", dst], capsys)
    assert_one_error_line(code, err, "already exists", "--force")
    assert (dst / "old.txt").read_text() == "old"
    code, _, err = run_cli(["--hf-path", src, "--mlx-path", dst, "--force", "--dtype", "float32"], capsys)
    assert code == 0, err
    assert not (dst / "old.txt").exists() and (dst / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlx", "src"]
    model, _ = cumo_mlx.load(dst)
    np.testing.assert_allclose(mlx_logits(model), reference_logits(ref), atol=TOL, rtol=0)
    # The checkpoint itself is never a valid destination, even with --force.
    code, _, err = run_cli(["--hf-path", src, "--mlx-path", src, "--force"], capsys)
    assert_one_error_line(code, err, "would replace the checkpoint")


@pytest.mark.parametrize("mlx_path", ["..", ".", "/"])
def test_force_never_replaces_a_mount_point_or_the_folders_around_us(tmp_path, capsys, monkeypatch, mlx_path):
    """A mount point cannot be moved aside (EBUSY); the folder we are in (or one holding it) would vanish."""
    config, _, state = reference("mistral-dense-mlp2x")
    src = write_checkpoint(tmp_path / "src", state, config)
    (tmp_path / "work" / "here").mkdir(parents=True)
    (tmp_path / "work" / "keep.txt").write_text("keep")
    monkeypatch.chdir(tmp_path / "work" / "here")
    code, _, err = run_cli(["--hf-path", src, "--mlx-path", mlx_path, "--force"], capsys)
    assert_one_error_line(code, err, "cannot be replaced")
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["here", "keep.txt"]


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import cumo_mlx
    from cumo_mlx.convert import convert as c

    original = c.ShardWriter.write
    def write(self, name, value):
        n = original(self, name, value)
        Path(sys.argv[3]).touch()  # mid-write: some tensors are in the shard, others are not
        time.sleep(600)
        return n
    c.ShardWriter.write = write
    c.convert(sys.argv[1], sys.argv[2], progress=False, force=sys.argv[4] == "force")
    """
)


@pytest.mark.parametrize("existing", [False, True], ids=["new-dst", "force-over-existing"])
def test_killed_conversion_leaves_no_destination(tmp_path, existing):
    config, ref, state = reference("mixtral-clipmoe-mlp2x")
    src = write_checkpoint(tmp_path / "src", state, config)
    dst, ready = tmp_path / "out" / "mlx", tmp_path / "ready"
    if existing:  # with --force, the old DST stays until the new one is complete
        dst.mkdir(parents=True)
        (dst / "keep.txt").write_text("an older conversion")
    before = snapshot(dst)
    args = [str(src), str(dst), str(ready), "force" if existing else ""]
    process = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, *args])
    try:
        deadline = time.time() + 240
        while not ready.exists():
            assert process.poll() is None, "the conversion ended before writing"
            assert time.time() < deadline
            time.sleep(0.05)
        temporaries = [p for p in dst.parent.iterdir() if p.name.startswith(".mlx.")]
        assert temporaries and any(temporaries[0].glob("model*.safetensors"))
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    if existing:
        assert snapshot(dst)["files"] == before["files"]
    else:
        assert not dst.exists()
    # The next conversion to the same place succeeds and clears the dead one's temporary directory.
    convert(str(src), str(dst), dtype="float32", progress=False, force=existing)
    assert sorted(p.name for p in dst.parent.iterdir()) == ["mlx"]
    model, _ = cumo_mlx.load(dst)
    np.testing.assert_allclose(mlx_logits(model), reference_logits(ref), atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# Hub ids


def fake_hub_cache(hub_cache: Path, repo_id: str, src: Path) -> Path:
    """`src` laid out as huggingface_hub's cache holds a downloaded snapshot of `repo_id`."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(src, repo / "snapshots" / commit)
    return repo


HUB_LOAD = textwrap.dedent(
    """
    import sys
    import cumo_mlx
    model, processor = cumo_mlx.load(sys.argv[1])
    print(type(model).__name__, type(processor).__name__)
    """
)


def test_hub_id_is_converted_once_into_the_cache(tmp_path):
    config, ref, state = reference("mixtral-dense-smoe")
    src = write_checkpoint(tmp_path / "src", state, config)  # mm_vision_tower: tiny-clip, in the snapshot
    fake_hub_cache(tmp_path / "hf" / "hub", "tiny-org/CuMo-tiny", src)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    for key in ("HF_HUB_CACHE", "CUMO_MLX_CACHE"):
        env.pop(key, None)
    first = subprocess.run(
        [sys.executable, "-c", HUB_LOAD, "tiny-org/CuMo-tiny"], capture_output=True, text=True, env=env, timeout=300
    )
    assert first.returncode == 0, first.stderr
    assert "Model Processor" in first.stdout and "converting to MLX (4-bit)" in first.stderr
    cached = tmp_path / "hf" / "cumo-mlx" / "tiny-org--CuMo-tiny-4bit"
    written = json.loads((cached / "config.json").read_text())
    assert written["quantization"]["bits"] == 4 and "vision_config" in written
    stamp = (cached / "model.safetensors").stat().st_mtime_ns
    second = subprocess.run(
        [sys.executable, "-c", HUB_LOAD, "tiny-org/CuMo-tiny"], capture_output=True, text=True, env=env, timeout=300
    )
    assert second.returncode == 0, second.stderr
    assert "converting" not in second.stderr
    assert (cached / "model.safetensors").stat().st_mtime_ns == stamp
    # Loaded in-process the cached model runs and stays close to the reference.
    model, _ = cumo_mlx.load(cached)
    diff = np.abs(mlx_logits(model) - reference_logits(ref))
    print(f"\nhub default (4-bit, group 64): max |logit diff| {diff.max():.4f}, mean {diff.mean():.4f}")
    assert np.isfinite(diff).all() and diff.mean() < 0.25


def test_hub_id_offline_without_cache_is_a_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("CUMO_MLX_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CuMoError) as info:
        cumo_mlx.load("tiny-org/not-downloaded")
    assert "tiny-org/not-downloaded is not in the local Hugging Face cache" in str(info.value)
    assert "HF_HUB_OFFLINE" in str(info.value)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_upload_repo(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, exist_ok):
            calls.append(("create", repo_id))

        def upload_folder(self, folder_path, repo_id, repo_type):
            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    config, _, state = reference("mistral-clipmoe-smoe")
    src = write_checkpoint(tmp_path / "src", state, config)
    convert(str(src), str(tmp_path / "mlx"), upload_repo="me/CuMo-tiny-mlx", progress=False)
    assert calls[0] == ("create", "me/CuMo-tiny-mlx")
    assert calls[1][:2] == ("upload", "me/CuMo-tiny-mlx") and "README.md" in calls[1][2]
    assert 'cumo_mlx.load("me/CuMo-tiny-mlx")' in (tmp_path / "mlx" / "README.md").read_text()


def test_cli_help_lists_mlx_lm_flags(capsys):
    code = cli_main(["convert", "--help"])
    out = capsys.readouterr().out
    assert code == 0
    for flag in (
        "--hf-path",
        "--mlx-path",
        "--quantize",
        "--q-bits",
        "--q-group-size",
        "--dtype",
        "--upload-repo",
        "--revision",
        "--vision-tower",
        "--quantize-vision",
        "--no-quantize-vision",
        "--vision-bits",
        "--force",
    ):
        assert flag in out


def test_weight_file_selection():
    from cumo_mlx.convert.checkpoint import select_weight_files

    index = {
        "model.safetensors.index.json": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        },
        "pytorch_model.bin.index.json": {
            "a": "pytorch_model-00001-of-00002.bin",
            "b": "pytorch_model-00002-of-00002.bin",
        },
    }
    read = index.__getitem__
    assert select_weight_files(["config.json", "model.safetensors", "pytorch_model.bin", "README.md"], read) == [
        "model.safetensors"
    ]
    assert select_weight_files(
        [
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "consolidated.safetensors",
            "sub/model.safetensors",
        ],
        read,
    ) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert select_weight_files(
        [
            "pytorch_model.bin.index.json",
            "pytorch_model-00001-of-00002.bin",
            "pytorch_model-00002-of-00002.bin",
            "training_args.bin",
        ],
        read,
    ) == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    assert select_weight_files(
        ["model.bin", "training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state_0.pth"]
    ) == ["model.bin"]


def test_tensor_in_two_files_and_index_naming_absent_tensors(tmp_path, capsys):
    config, _, state = reference("mistral-dense-mlp2x")
    src = write_checkpoint(tmp_path / "src", state, config, "bin")
    torch.save({"model.norm.weight": state["model.norm.weight"]}, src / "extra.bin")
    code, _, err = run_cli(["--hf-path", src, "--mlx-path", tmp_path / "a"], capsys)
    assert_one_error_line(code, err, "tensors stored twice", "model.norm.weight (extra.bin, pytorch_model.bin)")
    (src / "extra.bin").unlink()
    (src / "pytorch_model.bin").unlink()
    save_state_dict(state, src, "sharded")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.7.self_attn.q_proj.weight"] = "model-00001-of-00003.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    code, _, err = run_cli(["--hf-path", src, "--mlx-path", tmp_path / "b"], capsys)
    assert_one_error_line(
        code, err, "model.safetensors.index.json are not in its shards", "model.layers.7.self_attn.q_proj.weight"
    )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_quantization_options_without_quantize_are_refused(tmp_path, capsys):
    for flag, value in (("--q-bits", 8), ("--q-group-size", 32)):
        code, _, err = run_cli(["--hf-path", tmp_path, "--mlx-path", tmp_path / "x", flag, value], capsys)
        assert_one_error_line(code, err, f"{flag} has no effect without --quantize", "add -q")
    with pytest.raises(CuMoError, match="--q-bits has no effect without --quantize"):
        convert(str(tmp_path), str(tmp_path / "x"), q_bits=8)


def test_summary_says_what_was_left_unquantized(tmp_path, capsys):
    """Every LLM width of the tiny model is 32 or 96 wide: group 128 quantizes nothing (it said "4-bit"),
    group 64 leaves the 96-wide down projections as floats."""
    config, _, state = reference("mistral-dense-mlp2x")
    src = write_checkpoint(tmp_path / "src", state, config)
    code, out, err = run_cli(["--hf-path", src, "--mlx-path", tmp_path / "q128", "-q", "--q-group-size", 128], capsys)
    assert code == 0, err
    assert "(float32, nothing quantized)" in out and "4-bit" not in out
    assert "left at float32: their input size is not a multiple of the group size 128" in out
    code, out, err = run_cli(["--hf-path", src, "--mlx-path", tmp_path / "q64", "-q"], capsys)
    assert code == 0, err
    assert "LLM 4-bit, vision 8-bit, group 64" in out and "layer(s) left at float32" in out
    code, out, err = run_cli(["--hf-path", src, "--mlx-path", tmp_path / "q32", "-q", "--q-group-size", 32], capsys)
    assert code == 0 and "LLM 4-bit, vision 8-bit, group 32" in out and "left at" not in out, out


def test_no_torch_warning_on_a_protocol_4_pickle(tmp_path):
    """torch warns (UserWarning) on pickles written with protocol 4; the tensors are checked here."""
    config, _, state = reference("mistral-dense-mlp2x")
    src = write_checkpoint(tmp_path / "src", state, config)
    (src / "model.safetensors").unlink()
    torch.save({k: v.contiguous() for k, v in state.items()}, src / "pytorch_model.bin", pickle_protocol=4)
    command = [sys.executable, "-W", "default", "-c", "from cumo_mlx.cli.main import entry_point; entry_point()",
               "convert", "--hf-path", str(src),
               "--mlx-path", str(tmp_path / "mlx"), "--no-progress"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert "Warning" not in done.stderr, done.stderr
    assert done.returncode == 0 or done.stderr.count("\n") == 1, done.stderr


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("command", ["generate", "convert"])
def test_unreachable_hub_fails_at_once(tmp_path, command):
    """Without network (HF_HUB_OFFLINE unset) huggingface_hub retried for 49 s, printing 11 lines."""
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", HF_HOME=str(tmp_path / "hf"),
               CUMO_MLX_CACHE=str(tmp_path / "cache"))  # fmt: skip
    for key in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(key, None)
    args = {"generate": ["generate", "--model", "nobody-here/no-such-cumo", "--prompt", "hi"],
            "convert": ["convert", "--hf-path", "nobody-here/no-such-cumo", "--mlx-path", str(tmp_path / "out")]}[command]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", "from cumo_mlx.cli.main import entry_point; entry_point()", *args],
                          capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert time.monotonic() - started < 20
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "not in the local Hugging Face cache and the hub cannot be reached (http://127.0.0.1:" in done.stderr


def test_a_download_says_its_size_and_where_first(tmp_path, monkeypatch, capsys):
    """`generate` without --model fetches the 7B checkpoint: it says how much and where before starting."""
    from types import SimpleNamespace

    import huggingface_hub
    from huggingface_hub import constants

    from cumo_mlx import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("CUMO_MLX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "_unreachable", lambda: None)
    files = {"config.json": 2_000, "model.safetensors": 14_500_000_000, "tokenizer.model": 500_000, "README.md": 9, "x.bin": 7}
    siblings = [SimpleNamespace(rfilename=name, size=size) for name, size in files.items()]
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo_id, revision=None, files_metadata=False:
                        SimpleNamespace(siblings=siblings))  # fmt: skip
    fetched = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        fetched.append(allow_patterns)
        raise ConnectionError("stopped by the test")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: (_ for _ in ()).throw(ConnectionError()))
    code = cli_main(["generate", "--prompt", "hi"])  # no --model: the default hub checkpoint
    err = capsys.readouterr().err
    assert code == 2 and fetched and "model.safetensors" in fetched[0] and "x.bin" not in fetched[0]
    announce = f"shi-labs/CuMo-mistral-7b: downloading 3 files, 14.50 GB, into {tmp_path / 'hub'}"
    assert err.splitlines()[0].startswith(announce), err
    assert err.splitlines()[-1].startswith("error: cannot download shi-labs/CuMo-mistral-7b"), err
