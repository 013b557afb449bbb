"""LoRA / QLoRA adapters: saved by training, loaded onto the base, fused into a model directory."""

import json

import cumo_mlx
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from cumo_mlx.cli.main import main as cli_main
from cumo_mlx.errors import CheckpointError
from cumo_mlx.loader import save
from cumo_mlx.train.lora import is_quantized, load_adapters
from cumo_mlx.train.trainer import TrainConfig, Trainer
from mlx.utils import tree_flatten
from tiny_data import instruct_samples, write_dataset, write_images
from tiny_models import tiny_config, write_mlx_model

PROMPT = "<s>[INST] <image>\nWhat colour is the circle? [/INST] The circle is"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    names = write_images(root / "images")
    return {"root": root, "images": root / "images", "names": names, "data": write_dataset(root, instruct_samples(names))}


def train_adapters(work, model_dir, out, **overrides):
    settings = dict(model=str(model_dir), data=str(work["data"]), image_folder=str(work["images"]), output=str(out),
                    stage="sft", fine_tune_type="lora", iters=3, batch_size=2, lora_rank=4, lora_alpha=8.0,
                    learning_rate=1e-2, warmup_ratio=0.0, lora_dropout=0.0, progress=False)
    settings.update(overrides)
    Trainer(TrainConfig(**settings)).run()
    return out


def logits(model, processor, work) -> np.ndarray:
    model.eval()
    pixels = processor.preprocess_images([work["images"] / work["names"]["green"]])
    return np.array(model(processor.tokenize(PROMPT), pixels).astype(mx.float32))


@pytest.mark.parametrize("llm", ["mistral", "mixtral"])
def test_fused_model_equals_adapters_on_the_base(work, tmp_path, llm):
    base = write_mlx_model(tmp_path / "base", tiny_config(llm=llm))
    adapters = train_adapters(work, base, tmp_path / "adapters")
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["lora_parameters"]["scale"] == 2.0
    names = set(mx.load(str(adapters / "adapters.safetensors")))
    assert any(n.startswith("mm_projector.") for n in names) and any(n.startswith("vision_tower.") for n in names)
    if llm == "mixtral":  # LoRA on the stacked experts (mlx-lm's LoRASwitchLinear)
        assert any("block_sparse_moe.experts.gate_proj.lora_a" in n for n in names)

    model, processor = cumo_mlx.load(base)
    untouched = logits(model, processor, work)
    load_adapters(model, adapters)
    with_adapters = logits(model, processor, work)
    assert np.abs(with_adapters - untouched).max() > 1e-3  # the adapters do something

    assert cli_main(["fuse", "--model", str(base), "--adapter-path", str(adapters), "--mlx-path", str(tmp_path / "fused")]) == 0
    fused, processor = cumo_mlx.load(tmp_path / "fused")
    assert not any(".lora_" in k for k, _ in tree_flatten(fused.parameters()))
    assert np.abs(logits(fused, processor, work) - with_adapters).max() < 1e-4


def quantized_model(work, tmp_path):
    model, _ = cumo_mlx.load(write_mlx_model(tmp_path / "float", tiny_config()))
    nn.quantize(model, group_size=32, bits=4, class_predicate=lambda p, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 32 == 0)
    model.args.quantization = {"group_size": 32, "bits": 4}
    save(tmp_path / "q4", model, tokenizer_source=tmp_path / "float")
    return tmp_path / "q4"


def test_qlora_trains_adapters_on_a_quantized_model_and_fuses(work, tmp_path):
    base = quantized_model(work, tmp_path)
    adapters = train_adapters(work, base, tmp_path / "adapters")
    model, processor = cumo_mlx.load(base)
    assert is_quantized(model.language_model) and is_quantized(model.mm_projector)
    load_adapters(model, adapters)
    # the LLM stays quantized under its LoRA layers; the connector and CLIP trained in float
    assert is_quantized(model.language_model) and not is_quantized(model.mm_projector)
    with_adapters = logits(model, processor, work)

    out = tmp_path / "fused-float"
    assert cli_main(["fuse", "--model", str(base), "--adapter-path", str(adapters), "--mlx-path", str(out), "--dequantize"]) == 0
    fused, processor = cumo_mlx.load(out)
    assert not is_quantized(fused) and "quantization" not in json.loads((out / "config.json").read_text())
    assert np.abs(logits(fused, processor, work) - with_adapters).max() < 1e-4

    out = tmp_path / "fused-q4"
    assert cli_main(["fuse", "--model", str(base), "--adapter-path", str(adapters), "--mlx-path", str(out)]) == 0
    fused, processor = cumo_mlx.load(out)
    assert is_quantized(fused.language_model)
    assert np.isfinite(logits(fused, processor, work)).all()


def test_adapters_that_do_not_fit(work, tmp_path, capsys):
    base = write_mlx_model(tmp_path / "base", tiny_config())
    adapters = train_adapters(work, base, tmp_path / "adapters", iters=1)
    other = write_mlx_model(tmp_path / "other", tiny_config(llm="mixtral"))
    model, _ = cumo_mlx.load(other)
    with pytest.raises(CheckpointError, match="do not fit this model"):
        load_adapters(model, adapters)
    assert cli_main(["fuse", "--model", str(base), "--adapter-path", str(base), "--mlx-path", str(tmp_path / "x")]) == 2
    assert "full model directory" in capsys.readouterr().err


def test_fuse_never_writes_over_a_model_or_its_inputs_without_force(work, tmp_path, capsys):
    base = write_mlx_model(tmp_path / "base", tiny_config())
    adapters = train_adapters(work, base, tmp_path / "adapters", iters=1)
    other = write_mlx_model(tmp_path / "other", tiny_config(llm="mixtral"))
    before = (other / "config.json").read_bytes()
    fuse = ["fuse", "--model", str(base), "--adapter-path", str(adapters), "--mlx-path"]
    assert cli_main([*fuse, str(other)]) == 2
    assert "already exists" in capsys.readouterr().err and (other / "config.json").read_bytes() == before
    for target in (base, adapters):  # an input, even with --force
        assert cli_main([*fuse, str(target), "--force"]) == 2
        assert "an input of this command" in capsys.readouterr().err
    assert cli_main([*fuse, str(other), "--force"]) == 0
    assert (other / "config.json").read_bytes() != before  # the fused (Mistral) model replaced the Mixtral one
