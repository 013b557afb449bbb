"""Data parallel over mx.distributed: a real 2-process `mlx.launch --backend ring` run on localhost."""

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from cli_util import LAUNCH, launch_two_ranks
from cumo_mlx.train.trainer import TrainConfig, Trainer
from mlx.utils import tree_flatten
from tiny_data import instruct_samples, write_dataset, write_images
from tiny_models import tiny_config, write_mlx_model

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.skipif(LAUNCH is None, reason="mlx.launch is not installed")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    names = write_images(root / "images")
    settings = dict(
        model=str(write_mlx_model(root / "model", tiny_config())),
        data=str(write_dataset(root, instruct_samples(names))),  # 5 samples: step 2 has one, rank 1 none
        image_folder=str(root / "images"),
        stage="sft", fine_tune_type="lora", batch_size=4, iters=2, lora_rank=4, lora_dropout=0.0,
        learning_rate=1e-3, warmup_ratio=0.0, progress=False,
    )
    single = Trainer(TrainConfig(output=str(root / "single"), **settings))
    single.run()
    return root, settings, dict(tree_flatten(single.model.trainable_parameters()))


def metrics(out: Path) -> list:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_train_like_one_process_with_the_global_batch(work):
    """`cumo-mlx train` on 2 ranks: the ranks end with identical weights, equal to one process on the
    same global batch (4 samples per step, 2 per rank; the last step has 1 sample, rank 1 none)."""
    root, settings, single = work
    out = root / "ranks"
    options = []
    for key in ("model", "data", "image_folder", "stage", "fine_tune_type", "batch_size", "iters", "lora_rank",
                "lora_dropout", "learning_rate", "warmup_ratio"):
        options += ["--" + key.replace("_", "-"), str(settings[key])]
    worker = HERE / "distributed_worker.py"
    launch_two_ranks("--python", sys.executable, worker, "train", *options, "--output", out, "--no-progress")
    rank0 = mx.load(str(out / "rank0-of-2.safetensors"))
    rank1 = mx.load(str(out / "rank1-of-2.safetensors"))
    assert rank0.keys() == rank1.keys() == single.keys()
    assert all(np.array_equal(np.array(rank0[k]), np.array(rank1[k])) for k in rank0), "ranks diverged"
    # the same as one process on the whole batch (Adam leaves float noise in near-zero gradients)
    assert max(float(mx.abs(rank0[k] - single[k]).max()) for k in single) < 1e-4
    ours, theirs = metrics(out), metrics(root / "single")
    assert [r["step"] for r in ours] == [1, 2]
    for key in ("loss", "lm_loss", "vision_balance_loss", "vision_router_z_loss", "connector_balance_loss",
                "connector_router_z_loss", "grad_norm", "tokens", "samples"):
        assert [r[key] for r in ours] == pytest.approx([r[key] for r in theirs], rel=1e-5), key
    assert (out / "adapters.safetensors").is_file() and (out / "loss.png").is_file()
