"""Co-upcycling: the MoE model computes what the dense one did, until SFT moves experts and routers apart."""

import cumo_mlx
import numpy as np
import pytest
from cumo_mlx.cli.main import main as cli_main
from cumo_mlx.errors import CuMoError
from cumo_mlx.train.trainer import TrainConfig, Trainer
from cumo_mlx.train.upcycle import upcycle
from mlx.utils import tree_flatten
from tiny_data import instruct_samples, write_dataset, write_images
from tiny_models import tiny_config, write_mlx_model

PROMPT = "<s>[INST] <image>\nWhat colour is the circle? [/INST]"


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    return write_mlx_model(tmp_path_factory.mktemp("dense"), tiny_config(clip_smoe=False, connector="mlp2x_gelu"), seed=5)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    names = write_images(folder)
    return folder, names


def logits(model, processor, image_path) -> np.ndarray:
    model.eval()
    pixels = processor.preprocess_images([image_path])
    return np.array(model(processor.tokenize(PROMPT), pixels))


@pytest.mark.parametrize("vision, connector", [(True, True), (False, True), (True, False)])
def test_upcycled_logits_equal_the_dense_model(dense_dir, image, vision, connector):
    folder, names = image
    dense, processor = cumo_mlx.load(dense_dir)
    moe = upcycle(dense, num_experts=4, top_k=2, vision=vision, connector=connector, seed=1)
    assert moe.args.clip_smoe is vision and moe.args.connector_is_moe is connector
    expected = logits(dense, processor, folder / names["red"])
    got = logits(moe, processor, folder / names["red"])
    assert np.abs(got - expected).max() < 1e-5
    # every expert is the dense MLP; the routers are fresh (not all equal)
    if vision:
        dense_layer = dense.vision_tower.vision_model.encoder.layers[0].mlp
        experts = moe.vision_tower.vision_model.encoder.layers[0].mlp.experts
        for e in range(4):
            assert np.array_equal(np.array(experts.fc1.weight[e]), np.array(dense_layer.fc1.weight))
            assert np.array_equal(np.array(experts.fc2.bias[e]), np.array(dense_layer.fc2.bias))
    if connector:
        assert np.array_equal(np.array(moe.mm_projector.experts.fc2.weight[3]), np.array(dense.mm_projector.fc2.weight))
        assert np.abs(np.array(moe.mm_projector.gate.weight)).max() > 0


def test_cli_writes_a_loadable_moe_model(dense_dir, image, tmp_path):
    folder, names = image
    for seed, out in ((0, tmp_path / "a"), (0, tmp_path / "b"), (1, tmp_path / "c")):
        assert cli_main(["upcycle", "--model", str(dense_dir), "--mlx-path", str(out), "--num-experts", "3", "--top-k", "1",
                         "--seed", str(seed)]) == 0
    moe, processor = cumo_mlx.load(tmp_path / "a")
    assert moe.args.num_experts == 3 and moe.args.num_selected == 1 and moe.args.connector_is_moe
    dense, _ = cumo_mlx.load(dense_dir)
    assert np.abs(logits(moe, processor, folder / names["blue"]) - logits(dense, processor, folder / names["blue"])).max() < 1e-5
    routers = [dict((k, np.array(v)) for k, v in tree_flatten(cumo_mlx.load(tmp_path / n)[0].mm_projector.gate.parameters()))
               for n in "abc"]
    assert np.array_equal(routers[0]["weight"], routers[1]["weight"])  # seeded
    assert not np.array_equal(routers[0]["weight"], routers[2]["weight"])


def test_upcycling_an_moe_model_is_refused(tiny_mlx_model_dir, tmp_path, capsys):
    assert cli_main(["upcycle", "--model", str(tiny_mlx_model_dir), "--mlx-path", str(tmp_path / "x")]) == 2
    assert "nothing to upcycle" in capsys.readouterr().err
    model, _ = cumo_mlx.load(tiny_mlx_model_dir)
    with pytest.raises(CuMoError, match="--top-k 5 must be between 1 and --num-experts 4"):
        upcycle(model, 4, 5)


def test_upcycle_never_writes_over_a_model_without_force(dense_dir, tiny_mlx_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main(["upcycle", "--model", str(dense_dir), "--mlx-path", str(out), "--num-experts", "2", "--top-k", "1"]) == 0
    before = (out / "config.json").read_bytes()
    assert cli_main(["upcycle", "--model", str(dense_dir), "--mlx-path", str(out), "--num-experts", "3"]) == 2
    assert "already exists" in capsys.readouterr().err and (out / "config.json").read_bytes() == before
    assert cli_main(["upcycle", "--model", str(dense_dir), "--mlx-path", str(dense_dir), "--force"]) == 2
    assert "an input of this command" in capsys.readouterr().err
    assert cli_main(["upcycle", "--model", str(dense_dir), "--mlx-path", str(out), "--num-experts", "3", "--force"]) == 0
    assert cumo_mlx.load(out)[0].args.num_experts == 3


def test_sft_moves_routers_and_experts_apart(dense_dir, image, tmp_path):
    folder, names = image
    assert cli_main(["upcycle", "--model", str(dense_dir), "--mlx-path", str(tmp_path / "moe")]) == 0
    data = write_dataset(tmp_path, instruct_samples(names))
    trainer = Trainer(TrainConfig(model=str(tmp_path / "moe"), data=str(data), image_folder=str(folder), output=str(tmp_path / "out"),
                                  stage="sft", iters=4, batch_size=2, learning_rate=1e-3, warmup_ratio=0.0, lora_rank=4, progress=False))
    before = dict(tree_flatten(trainer.model.parameters()))
    trainer.run()
    after = dict(tree_flatten(trainer.model.parameters()))
    routers = [k for k in after if k.endswith("gate.weight") and not k.startswith("language_model")]
    assert routers and all(not np.array_equal(np.array(before[k]), np.array(after[k])) for k in routers)
    for name in ("mm_projector.experts.fc1.weight", "vision_tower.vision_model.encoder.layers.0.mlp.experts.fc1.weight"):
        w = np.array(after[name])
        assert np.array_equal(np.array(before[name])[0], np.array(before[name])[1])
        assert any(not np.array_equal(w[0], w[e]) for e in range(1, w.shape[0])), f"{name}: experts still equal"
    # and the model no longer computes what the dense one does
    dense, processor = cumo_mlx.load(dense_dir)
    assert np.abs(logits(trainer.model, processor, folder / names["red"]) - logits(dense, processor, folder / names["red"])).max() > 1e-3
