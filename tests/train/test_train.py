"""Training: loss parity with the PyTorch reference, what each stage trains, metrics, checkpoints, resume."""

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cumo_mlx
import mlx.core as mx
import mlx.optimizers as mlx_optim
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cumo_mlx.cli.main import main as cli_main
from cumo_mlx.errors import CuMoError, DataError
from cumo_mlx.models.config import ModelArgs
from cumo_mlx.models.model import Model
from cumo_mlx.train.checkpoints import TrainingError
from cumo_mlx.train.data import Dataset, collate, first_target
from cumo_mlx.train.losses import Totals, batch_losses
from cumo_mlx.train.optim import adamw, compiled_update, cosine_lr, vision_and_rest
from cumo_mlx.train.options import TrainConfig
from cumo_mlx.train.trainer import Trainer
from mlx.utils import tree_flatten, tree_map
from tiny_data import caption_samples, instruct_samples, write_dataset, write_images
from tiny_models import tiny_config, write_mlx_model
from torch_reference import balance_loss as ref_balance
from torch_reference import build_reference, original_state_dict
from torch_reference import router_z_loss as ref_z

TOL = 1e-4
TIMING = ("seconds", "tokens_per_second", "peak_memory_gb")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    names = write_images(root / "images")
    return {
        "root": root,
        "images": root / "images",
        "names": names,
        "instruct": write_dataset(root, instruct_samples(names), "instruct.json"),
        "captions": write_dataset(root, caption_samples(names), "captions.json"),
        "moe": write_mlx_model(root / "moe", tiny_config()),
        "dense": write_mlx_model(root / "dense", tiny_config(clip_smoe=False, connector="mlp2x_gelu")),
        "mixtral": write_mlx_model(root / "mixtral", tiny_config(llm="mixtral")),
    }


def config(work, out, model="moe", data="instruct", **overrides) -> TrainConfig:
    settings = dict(
        model=str(work.get(model, model)), data=str(work.get(data, data)), image_folder=str(work["images"]), output=str(out),
        stage="sft", fine_tune_type="lora", batch_size=2, iters=4, lora_rank=4, lora_alpha=8.0, lora_dropout=0.0,
        learning_rate=1e-3, warmup_ratio=0.0, progress=False,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def flat(tree) -> dict:
    return dict(tree_flatten(tree))


def records(out: Path) -> list:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without_timing(rs: list) -> list:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rs]


def run_until(trainer: Trainer, last: int) -> None:
    """Train until step `last` is logged, then stop as if killed there."""
    for record in trainer.steps():
        if record["step"] == last:
            break


# ---------------------------------------------------------------------------------------------
# Loss parity with the independent PyTorch reference (same weights)
# ---------------------------------------------------------------------------------------------


def reference_pair(llm: str, seed: int = 0):
    cfg = tiny_config(llm=llm)
    reference = build_reference(cfg, seed=seed)
    model = Model(ModelArgs.from_dict(cfg))
    state = original_state_dict(reference)
    model.load_weights(list(model.sanitize({k: mx.array(v.numpy()) for k, v in state.items()}).items()))
    model.train()
    return cfg, reference, model


def nchw(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The reference's tiny matmuls run fastest (and steadiest on a busy machine) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def encoded_samples(work):
    processor = cumo_mlx.load(work["moe"])[1]
    samples = instruct_samples(work["names"])
    samples.insert(0, {"id": "two", "image": [work["names"]["red"], work["names"]["blue"]], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nWhich one is red?"}, {"from": "gpt", "value": "the first one"},
        {"from": "human", "value": "And the other?"}, {"from": "gpt", "value": "blue"}]})
    data = Dataset(write_dataset(work["root"], samples, "parity.json"), processor, work["images"])
    return [e for _, e in data.load(range(len(data)))]


def test_loss_matches_reference_on_one_sample(encoded_samples):
    cfg, reference, model = reference_pair("mixtral")
    sample = encoded_samples[1]  # one image, two turns
    total, parts = batch_losses(model, collate([sample], 16, None).as_mx())
    with torch.no_grad():
        out = reference(sample.ids, nchw(sample.pixels), sample.labels)
    expected = {
        "lm_loss": out.lm_loss, "vision_balance_loss": out.aux["clip_balance"], "vision_router_z_loss": out.aux["clip_z"],
        "connector_balance_loss": out.aux["mlp_balance"], "connector_router_z_loss": out.aux["mlp_z"],
        "llm_balance_loss": out.aux["llm_balance"], "llm_router_z_loss": out.aux["llm_z"],
    }
    assert set(parts) == set(expected)
    for key, value in expected.items():
        assert abs(parts[key].item() - value.item()) <= TOL, key
    assert abs(total.item() - out.loss.item()) <= TOL


def test_batch_loss_matches_reference_formulas(encoded_samples):
    """A padded batch (two images / text only / one image) against the reference formulas over the
    batch: cross-entropy over all supervised tokens, CLIP and connector terms over all the batch's
    images, the Mixtral terms over all real (non-padding) tokens."""
    cfg, reference, model = reference_pair("mixtral", seed=1)
    samples = [encoded_samples[0], encoded_samples[-1], encoded_samples[2]]
    total, parts = batch_losses(model, collate(samples, 16, None).as_mx())

    with torch.no_grad():
        ce_sum, count, router_logits = 0.0, 0, []
        for s in samples:
            out = reference(s.ids, None if s.pixels is None else nchw(s.pixels), s.labels)
            labels = out.labels[1:]
            ce_sum += F.cross_entropy(out.logits[0, :-1], labels, ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
            router_logits.append(out.llm_router_logits)
        pixels = np.concatenate([s.pixels for s in samples if s.pixels is not None])
        _, vision, connector = reference.encode_images(nchw(pixels))
        layers = [torch.cat([r[i] for r in router_logits]) for i in range(len(router_logits[0]))]
        llm_balance = sum(ref_balance(r, r.argmax(-1), per_sequence=False) for r in layers) / len(layers)
        llm_z = sum(ref_z(r) for r in layers) / len(layers)
    expected = {
        "lm_loss": ce_sum / count,
        "vision_balance_loss": vision.balance_loss.item(), "vision_router_z_loss": vision.router_z_loss.item(),
        "connector_balance_loss": connector.balance_loss.item(), "connector_router_z_loss": connector.router_z_loss.item(),
        "llm_balance_loss": llm_balance.item(), "llm_router_z_loss": llm_z.item(),
    }
    for key, value in expected.items():
        assert abs(parts[key].item() - value) <= TOL, key
    balance = sum(v for k, v in expected.items() if k.endswith("balance_loss"))
    z = sum(v for k, v in expected.items() if k.endswith("router_z_loss"))
    assert abs(total.item() - (expected["lm_loss"] + 0.1 * balance + 0.01 * z)) <= TOL


def test_step_shares_add_up_to_the_whole_batch(encoded_samples):
    """Two halves scored against the totals of both (accumulation / ranks) sum to the whole batch."""
    _, _, model = reference_pair("mistral", seed=2)
    batches = [collate(encoded_samples[:2], 16, None), collate(encoded_samples[2:], 16, None)]
    whole_total, whole = batch_losses(model, collate(encoded_samples, 16, None).as_mx())
    totals = Totals.of(batches)
    halves = [batch_losses(model, b.as_mx(), totals) for b in batches]
    assert abs(sum(h[0].item() for h in halves) - whole_total.item()) <= 1e-5
    for key in whole:
        assert abs(sum(h[1][key].item() for h in halves) - whole[key].item()) <= 1e-5, key


# ---------------------------------------------------------------------------------------------
# What each stage trains
# ---------------------------------------------------------------------------------------------


def groups_changed(before: dict, after: dict) -> dict:
    """{group: (changed, total)} for vision / connector / llm base weights / lora matrices."""
    out = {}
    for name, value in after.items():
        if name.endswith((".lora_a", ".lora_b")):
            group = "lora"
        else:
            group = {"vision_tower": "vision", "mm_projector": "connector", "language_model": "llm"}[name.split(".")[0]]
        key = name.replace(".linear.", ".")  # LoRA wraps the base layer
        old = before.get(key, before.get(name))
        changed = old is None or not np.array_equal(np.array(old), np.array(value))
        c, t = out.get(group, (0, 0))
        out[group] = (c + changed, t + 1)
    return out


@pytest.mark.parametrize(
    "model, data, overrides, trained",
    [
        ("dense", "captions", dict(stage="pretrain"), {"connector"}),
        ("dense", "instruct", dict(stage="pft", fine_tune_type="full"), {"vision", "connector", "llm"}),
        ("moe", "instruct", dict(stage="sft"), {"vision", "connector", "lora"}),
        ("moe", "instruct", dict(stage="sft", freeze_vision=True), {"connector", "lora"}),
        ("mixtral", "instruct", dict(stage="sft", fine_tune_type="full", freeze_connector=True), {"vision", "llm"}),
    ],
)
def test_each_stage_trains_only_its_parts(work, tmp_path, model, data, overrides, trained):
    trainer = Trainer(config(work, tmp_path / "out", model, data, iters=2, **overrides))
    before = flat(trainer.model.parameters())
    trainer.run()
    changed = groups_changed(before, flat(trainer.model.parameters()))
    for group, (count, total) in changed.items():
        if group in trained:
            assert count > 0, f"{group} did not train"
        else:
            assert count == 0, f"{group}: {count} of {total} tensors changed"
    assert trained <= set(changed)


def test_pretrain_uses_plain_template_and_writes_a_model(work, tmp_path):
    out = tmp_path / "out"
    trainer = Trainer(config(work, out, "dense", "captions", stage="pretrain", iters=2))
    assert trainer.config.template == "plain" and trainer.config.learning_rate == 1e-3
    trainer.run()
    model, processor = cumo_mlx.load(out)  # a full model directory
    trained = flat(trainer.model.mm_projector.parameters())
    assert all(np.array_equal(np.array(v), np.array(trained[k])) for k, v in flat(model.mm_projector.parameters()).items())


def test_a_model_from_convert_q_trains_its_connector_and_loads_again(work, tmp_path):
    """`convert -q` stores the LLM at 4 bits and the vision side at 8, the latter as per-layer config
    entries: a connector dequantized to train must not be quantized again when the result loads."""
    from cumo_mlx.convert.convert import quantization_plan
    from cumo_mlx.loader import save
    from cumo_mlx.train.lora import is_quantized

    model, _ = cumo_mlx.load(work["dense"])
    model.args.quantization = quantization_plan(model, 4, 32, vision_bits=8).config
    assert is_quantized(model.mm_projector) and model.mm_projector.fc1.bits == 8
    save(tmp_path / "q", model, tokenizer_source=work["dense"])
    out = tmp_path / "out"
    trainer = Trainer(config(work, out, model=tmp_path / "q", data="captions", stage="pretrain", iters=1))
    trainer.run()
    trained, _ = cumo_mlx.load(out)
    assert not is_quantized(trained.mm_projector) and is_quantized(trained.language_model)
    assert trained.vision_tower.vision_model.encoder.layers[0].mlp.fc1.bits == 8
    expected = flat(trainer.model.mm_projector.parameters())
    assert all(np.array_equal(np.array(v), np.array(expected[k])) for k, v in flat(trained.mm_projector.parameters()).items())


def test_full_finetune_refuses_quantized_llm(work, tmp_path):
    import mlx.nn as nn
    from cumo_mlx.loader import save

    model, _ = cumo_mlx.load(work["moe"])
    nn.quantize(model.language_model, group_size=32, bits=4)
    model.args.quantization = {"group_size": 32, "bits": 4}
    save(tmp_path / "q", model, tokenizer_source=work["moe"])
    with pytest.raises(CuMoError, match="full fine-tuning needs a language model that is not quantized"):
        Trainer(config(work, tmp_path / "out", model=tmp_path / "q", fine_tune_type="full"))


def test_loss_goes_down_on_a_memorisation_set(work, tmp_path):
    out = tmp_path / "out"
    Trainer(config(work, out, fine_tune_type="full", iters=30, batch_size=5, learning_rate=3e-3, warmup_ratio=0.1)).run()
    losses = [r["loss"] for r in records(out)]
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# Metrics, schedule, accumulation, checkpointing
# ---------------------------------------------------------------------------------------------


def test_metrics_record_per_step_and_step_one_is_the_initial_loss(work, tmp_path):
    out = tmp_path / "out"
    trainer = Trainer(config(work, out, model="mixtral", iters=3, warmup_ratio=0.5))
    batches, _ = trainer.data.load(1)
    trainer.model.train()
    _, initial = batch_losses(trainer.model, batches[0].as_mx(), Totals.of(batches))
    trainer.run()
    rs = records(out)
    assert [r["step"] for r in rs] == [1, 2, 3]
    expected_keys = {"step", "lr", "loss", "lm_loss", "tokens", "seconds", "vision_balance_loss", "vision_router_z_loss",
                     "connector_balance_loss", "connector_router_z_loss", "llm_balance_loss", "llm_router_z_loss"}
    assert expected_keys <= set(rs[0])
    for key, value in initial.items():
        assert rs[0][key] == pytest.approx(value.item(), abs=1e-6), key
    assert [r["lr"] for r in rs] == [cosine_lr(i, 3, 1e-3, 0.5) for i in range(3)]
    assert [r["lr"] for r in rs] == pytest.approx([0.0, 5e-4, 1e-3])  # 2 warmup steps, then the cosine from the peak
    assert all(r["tokens"] > 0 for r in rs)


def test_vision_learning_rate_sets_the_towers_own_peak(work, tmp_path):
    """--vision-learning-rate 0 keeps CLIP where it was while the connector and the LLM train at --learning-rate."""
    out = tmp_path / "out"
    trainer = Trainer(config(work, out, model="dense", stage="pft", fine_tune_type="full", iters=3, warmup_ratio=0.5,
                             vision_learning_rate=0.0))
    before = {k: np.array(v) for k, v in flat(trainer.model.parameters()).items()}
    trainer.run()
    after = flat(trainer.model.parameters())
    moved = {k.split(".")[0] for k, v in after.items() if not np.array_equal(np.array(v, copy=False), before[k])}
    assert moved == {"mm_projector", "language_model"}
    rs = records(out)
    assert [r["vision_lr"] for r in rs] == [0.0, 0.0, 0.0]
    assert [r["lr"] for r in rs] == pytest.approx([0.0, 5e-4, 1e-3])


def test_cosine_schedule():
    values = [cosine_lr(s, 100, 1.0, 0.03) for s in range(100)]
    assert values[0] == 0.0 and values[3] == 1.0 and values[1] == pytest.approx(1 / 3)
    assert all(a >= b for a, b in zip(values[3:], values[4:])) and values[-1] < 0.01


def test_adamw_is_torchs():
    """Three updates (weight decay included) equal torch.optim.AdamW's; MLX's default AdamW, without
    the bias correction, makes the first update ~3x larger."""
    rng = np.random.default_rng(0)
    start = rng.standard_normal((4, 3)).astype(np.float32)
    grads = [rng.standard_normal((4, 3)).astype(np.float32) for _ in range(3)]
    optimizer, params = adamw(1e-2, weight_decay=0.1), {"w": mx.array(start)}
    for grad in grads:
        params = optimizer.apply_gradients({"w": mx.array(grad)}, params)
    weight = torch.nn.Parameter(torch.tensor(start))
    reference = torch.optim.AdamW([weight], lr=1e-2, weight_decay=0.1)
    for grad in grads:
        weight.grad = torch.tensor(grad)
        reference.step()
    np.testing.assert_allclose(np.array(params["w"]), weight.detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.5])
def test_compiled_update_equals_the_plain_one(max_grad_norm):
    """Three updates at changing rates: the compiled update gives the gradient norms and weights of
    clip_grad_norm and the two AdamWs run operation by operation."""
    models, optimizers = [], []
    for _ in range(2):
        mx.random.seed(0)
        models.append(Model(ModelArgs.from_dict(tiny_config())))
        optimizers.append(vision_and_rest(0.1))
        optimizers[-1].init(models[-1].trainable_parameters())
    plain, compiled = models
    apply = compiled_update(optimizers[1], compiled, max_grad_norm)
    for rates in [(1e-3, 2e-3), (5e-4, 1e-3), (0.0, 3e-3)]:
        grads = tree_map(lambda p: mx.random.normal(p.shape), plain.trainable_parameters())
        norm = None
        if max_grad_norm > 0:
            clipped, norm = mlx_optim.clip_grad_norm(grads, max_grad_norm)
        for part, rate in zip(optimizers[0].optimizers, rates):
            part.learning_rate = rate
        optimizers[0].update(plain, clipped if max_grad_norm > 0 else grads)
        got = apply(grads, rates)
        assert (got is None) == (norm is None)
        if norm is not None:
            assert got.item() == pytest.approx(norm.item(), rel=1e-6)
    a, b = flat(plain.parameters()), flat(compiled.parameters())
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(np.array(b[k]), np.array(a[k]), rtol=1e-6, atol=1e-7, err_msg=k)


def test_accumulation_equals_one_big_batch(work, tmp_path):
    """4 samples: a step of one batch of 4 and a step of two accumulated batches of 2 see the same samples."""
    data = write_dataset(tmp_path, instruct_samples(work["names"])[:4])
    one = Trainer(config(work, tmp_path / "a", data=data, batch_size=4, iters=2, fine_tune_type="full"))
    one.run()
    two = Trainer(config(work, tmp_path / "b", data=data, batch_size=2, grad_accumulation_steps=2, iters=2, fine_tune_type="full"))
    two.run()
    # Adam's update hardly depends on the gradient's scale: the losses and gradient norms check that
    for key in ("loss", "lm_loss", "vision_balance_loss", "connector_router_z_loss", "grad_norm"):
        assert [r[key] for r in records(tmp_path / "a")] == pytest.approx([r[key] for r in records(tmp_path / "b")], rel=1e-5)
    a, b = flat(one.model.trainable_parameters()), flat(two.model.trainable_parameters())
    assert max(float(mx.abs(a[k] - b[k]).max()) for k in a) < 1e-4  # a tenth of one step


@pytest.mark.parametrize("dispatch", ["auto", "gather"])
def test_grad_checkpoint_gives_the_same_training(work, tmp_path, dispatch, monkeypatch):
    """Mixtral: with "gather" every layer is checkpointed, MoE ones included; on the CPU's "grouped"
    dispatch the MoE layers are left plain (checkpointing them there costs memory)."""
    monkeypatch.setenv("CUMO_MLX_MOE_DISPATCH", dispatch)
    plain = Trainer(config(work, tmp_path / "a", iters=3, model="mixtral"))
    plain.run()
    checkpointed = Trainer(config(work, tmp_path / "b", iters=3, model="mixtral", grad_checkpoint=True))
    layers = list(checkpointed.model.language_model.layers) + list(checkpointed.model.vision_tower.vision_model.encoder.layers)
    wrapped = [type(layer).__name__.startswith("Checkpointed") for layer in layers]
    assert all(wrapped) if dispatch == "gather" else not any(wrapped)
    checkpointed.run()
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in records(tmp_path / "a")] == pytest.approx([r[key] for r in records(tmp_path / "b")], rel=1e-5)
    a, b = flat(plain.model.trainable_parameters()), flat(checkpointed.model.trainable_parameters())
    assert max(float(mx.abs(a[k] - b[k]).max()) for k in a) < 1e-4


def test_resume_is_bit_identical(work, tmp_path):
    """Stopped after step 5 (checkpoints at 2 and 4), resumed: the same weights and records as one run.
    LoRA dropout and gradient checkpointing are on, so the random draws must resume too."""
    settings = dict(iters=7, save_every=2, keep_checkpoints=2, lora_dropout=0.1, grad_checkpoint=True, batch_size=2)
    Trainer(config(work, tmp_path / "whole", **settings)).run()
    run_until(Trainer(config(work, tmp_path / "cut", **settings)), 5)
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    assert len(records(tmp_path / "cut")) == 5
    Trainer(config(work, tmp_path / "cut", resume=True, **settings)).run()
    whole = mx.load(str(tmp_path / "whole" / "adapters.safetensors"))
    cut = mx.load(str(tmp_path / "cut" / "adapters.safetensors"))
    assert whole.keys() == cut.keys()
    assert all(np.array_equal(np.array(whole[k]), np.array(cut[k])) for k in whole)
    assert without_timing(records(tmp_path / "whole")) == without_timing(records(tmp_path / "cut"))


def test_killed_run_resumes_losing_only_the_steps_since_the_checkpoint(work, tmp_path):
    args = ["train", "--model", str(work["moe"]), "--data", str(work["instruct"]), "--image-folder", str(work["images"]),
            "--batch-size", "2", "--iters", "20", "--save-every", "3", "--lora-rank", "4", "--lora-dropout", "0",
            "--learning-rate", "1e-3", "--no-progress"]
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-c", "from cumo_mlx.cli.main import entry_point; entry_point()",
                                *args, "--output", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step-0000003").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "adapters.safetensors").exists(), "the run finished before it could be killed"
    assert cli_main([*args, "--output", str(killed), "--resume"]) == 0
    assert cli_main([*args, "--output", str(tmp_path / "whole")]) == 0
    whole = mx.load(str(tmp_path / "whole" / "adapters.safetensors"))
    resumed = mx.load(str(killed / "adapters.safetensors"))
    assert all(np.array_equal(np.array(whole[k]), np.array(resumed[k])) for k in whole)
    assert without_timing(records(tmp_path / "whole")) == without_timing(records(killed))


def test_existing_run_needs_resume(work, tmp_path):
    Trainer(config(work, tmp_path / "out", iters=2, save_every=1)).run()
    with pytest.raises(CuMoError, match="already holds checkpoints"):
        Trainer(config(work, tmp_path / "out", iters=2))
    with pytest.raises(TrainingError, match="different run.*batch_size"):
        Trainer(config(work, tmp_path / "out", iters=2, save_every=1, batch_size=3, resume=True)).run()


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(work, tmp_path):
    out = tmp_path / "out"
    trainer = Trainer(config(work, out, iters=6, save_every=1, learning_rate=1e30, fine_tune_type="full", max_grad_norm=0.0))
    with pytest.raises(TrainingError, match=r"at step (\d+)") as info:
        trainer.run()
    step = int(info.value.what.split("at step ")[1].split(";")[0])
    assert step >= 2 and str(out / "checkpoints" / f"step-{step - 1:07d}") in str(info.value)
    assert (out / "checkpoints" / f"step-{step - 1:07d}" / "state.json").is_file()
    assert not (out / "checkpoints" / f"step-{step:07d}").exists() and not (out / "config.json").exists()
    assert all(math.isfinite(r["loss"]) for r in records(out))


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def test_cli_with_yaml_config(work, tmp_path, capsys):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(
        f"model: {work['moe']}\ndata: {work['instruct']}\nimage_folder: {work['images']}\nadapter_path: {tmp_path / 'out'}\n"
        "stage: sft\niters: 2\nbatch_size: 2\nlearning_rate: 1e-4\nlora_parameters: {rank: 4, scale: 2.0, dropout: 0.0}\n"
    )
    assert cli_main(["train", "-c", str(cfg), "--no-progress", "--lora-layers", "1"]) == 0
    adapter = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert adapter["lora_parameters"]["rank"] == 4 and adapter["lora_parameters"]["scale"] == 2.0
    assert adapter["training"]["learning_rate"] == 1e-4 and adapter["num_layers"] == 1
    names = mx.load(str(tmp_path / "out" / "adapters.safetensors")).keys()
    assert any("layers.1." in n and n.endswith("lora_a") for n in names) and not any("layers.0." in n for n in names if "language" in n)
    bad = tmp_path / "bad.yaml"
    bad.write_text("lerning_rate: 1\n")
    assert cli_main(["train", "-c", str(bad)]) == 2
    assert "unknown setting(s) lerning_rate" in capsys.readouterr().err


def test_cli_reports_and_counts_bad_samples(work, tmp_path, capsys):
    samples = instruct_samples(work["names"]) + [
        {"id": "ghost", "image": "ghost.png", "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "x"}]}
    ]
    data = write_dataset(tmp_path, samples)
    base = ["train", "--model", str(work["moe"]), "--data", str(data), "--image-folder", str(work["images"]),
            "--iters", "1", "--batch-size", "2", "--lora-rank", "4", "--no-progress"]
    assert cli_main([*base, "--output", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "skipping sample 'ghost' (#5): image file not found: ghost.png" in out and "skipped 1 bad sample(s)" in out
    assert cli_main([*base, "--output", str(tmp_path / "b"), "--strict"]) == 2
    assert "'ghost'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Settings, runs with nothing to train, failed runs, resuming another model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(seed=-1), r"--seed must be in \[0, 4294967295\]"),
        (dict(seed=12345678901234567890), r"--seed must be in \[0, 4294967295\]"),
        (dict(iters=None, epochs=math.inf), "--epochs must be positive and finite"),
        (dict(iters=None, epochs=math.nan), "--epochs must be positive and finite"),
        (dict(iters=None, epochs=[1]), r"--epochs must be a number, not \[1\]"),
        (dict(iters={"a": 1}), "--iters must be a whole number"),
        (dict(batch_size=2.5), "--batch-size must be a whole number, not 2.5"),
        (dict(iters=True), "--iters must be a whole number, not True"),
        (dict(max_seq_length=0), "--max-seq-length must be at least 2"),
        (dict(max_seq_length=1), "--max-seq-length must be at least 2"),
        (dict(lora_layers=-2), "--lora-layers must be positive, or -1 for all"),
        (dict(max_grad_norm=math.inf), "--max-grad-norm must be non-negative and finite"),
        (dict(strict="yes"), "--strict must be true or false"),
        (dict(data=3), "--data must be a text"),
    ],
)
def test_every_setting_is_checked_in_one_place(settings, message):
    """TrainConfig checks the type and range of every setting, for the API, the CLI and the YAML alike."""
    with pytest.raises(CuMoError, match=message):
        TrainConfig(**{"model": "m", "data": "d", "output": "o", "iters": 1, **settings}).resolved()
    resolved = TrainConfig(model="m", data=Path("d"), output="o", learning_rate=1, seed=2**32 - 1).resolved()
    assert resolved.learning_rate == 1.0 and isinstance(resolved.learning_rate, float) and resolved.data == "d"


def test_a_sample_whose_answers_are_truncated_away_is_skipped(work, tmp_path, capsys):
    # the others' answers start within 116 positions (image rows included), this one's at 790
    long = {"id": "long", "conversations": [{"from": "human", "value": "many words " * 100}, {"from": "gpt", "value": "yes"}]}
    data = write_dataset(tmp_path, instruct_samples(work["names"]) + [long])
    trainer = Trainer(config(work, tmp_path / "out", data=data, batch_size=6, iters=2, max_seq_length=200))
    result = trainer.run()
    assert "skipping sample 'long' (#5): its answers all lie past --max-seq-length 200" in capsys.readouterr().out
    assert result["skipped"] == 1 and [r["samples"] for r in records(tmp_path / "out")] == [5, 5]


def test_first_target_is_where_truncation_starts_losing_answers(encoded_samples):
    for sample in encoded_samples:  # two images, one, none
        first = first_target(sample, 16)
        assert collate([sample], 16, first).num_targets == 0 < collate([sample], 16, first + 1).num_targets


@pytest.mark.parametrize("cause", ["answers past --max-seq-length", "unreadable images"])
def test_nothing_trainable_is_an_error_and_leaves_no_output(work, tmp_path, cause):
    """Every sample turns out bad while loading: exit 2 with nothing written, the folders it made removed."""
    folder, settings = work["images"], dict(max_seq_length=4)
    if cause == "unreadable images":
        folder, settings = tmp_path / "broken", {}
        folder.mkdir()
        for name in work["names"].values():
            (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        data = write_dataset(tmp_path, [s for s in instruct_samples(work["names"]) if "image" in s])
    else:
        data = work["instruct"]
    out = tmp_path / "new" / "out"
    trainer = Trainer(config(work, out, data=data, image_folder=str(folder), iters=5, save_every=1, **settings))
    with pytest.raises(DataError, match="no usable samples left|nothing was trained"):
        trainer.run()
    assert not (tmp_path / "new").exists()
    # Seen by one step alone (2 of 5 samples): the end of the run finds nothing trained.
    with pytest.raises(DataError, match="nothing was trained"):
        Trainer(config(work, out, data=data, image_folder=str(folder), iters=1, **settings)).run()
    assert not (tmp_path / "new").exists()


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_output(work, tmp_path, monkeypatch):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")

    def crash(self, step, batches, error):
        raise RuntimeError("a bug")

    monkeypatch.setattr(Trainer, "train_step", crash)
    for out in (tmp_path / "a" / "b", existing):
        with pytest.raises(RuntimeError, match="a bug"):
            Trainer(config(work, out)).run()
    assert not (tmp_path / "a").exists()
    assert sorted(p.name for p in existing.iterdir()) == ["keep.txt", "metrics.jsonl"]  # not ours to remove


def test_resume_refuses_another_model_of_the_same_shapes(work, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(work["moe"], other)
    weights = mx.load(str(other / "model.safetensors"))
    name = next(k for k in sorted(weights) if "mm_projector" in k and k.endswith("weight"))
    weights[name] = weights[name] + 1
    mx.save_safetensors(str(other / "model.safetensors"), weights)
    out = tmp_path / "out"
    run_until(Trainer(config(work, out, iters=3, save_every=1)), 1)
    with pytest.raises(TrainingError, match=f"different run.*model: {work['moe'].resolve()} there, {other} now"):
        Trainer(config(work, out, model=other, iters=3, save_every=1, resume=True)).run()
    moved = tmp_path / "moved"  # the same model in another folder resumes
    shutil.copytree(work["moe"], moved)
    assert Trainer(config(work, out, model=moved, iters=3, save_every=1, resume=True)).run()["steps"] == 3


# ---------------------------------------------------------------------------------------------
# Bookkeeping: random draws per step, steps without samples, checkpoints kept
# ---------------------------------------------------------------------------------------------


def test_every_step_and_micro_batch_draws_its_own_randomness(work, tmp_path):
    """Dropout masks differ from step to step and micro-batch to micro-batch, and repeat on resume."""
    trainer = Trainer(config(work, tmp_path / "out", lora_dropout=0.1))

    def draw(step, micro):
        trainer._seed(step, micro)
        return tuple(np.array(mx.random.uniform(shape=(8,))).tolist())

    draws = {(step, micro): draw(step, micro) for step in (1, 2, 3) for micro in (0, 1)}
    assert len(set(draws.values())) == len(draws)
    assert draw(2, 1) == draws[2, 1]


def test_a_step_whose_samples_were_all_bad_leaves_weights_and_optimizer_alone(work, tmp_path):
    """No AdamW momentum nor weight decay acts on the zero gradients of a step without samples."""
    trainer = Trainer(config(work, tmp_path / "out", weight_decay=0.1, iters=3))
    trainer.begin()
    trainer.train_step(1, trainer.data.load(1)[0], None)
    weights, state = flat(trainer.model.trainable_parameters()), flat(trainer.optimizer.state)
    record = trainer.train_step(2, [], None)
    assert record["samples"] == 0
    after, state_after = flat(trainer.model.trainable_parameters()), flat(trainer.optimizer.state)
    assert all(np.array_equal(np.array(weights[k]), np.array(after[k])) for k in weights)
    assert state.keys() == state_after.keys()
    assert all(np.array_equal(np.array(state[k]), np.array(state_after[k])) for k in state)


def test_keep_checkpoints_keeps_exactly_the_last_n(work, tmp_path):
    Trainer(config(work, tmp_path / "out", iters=5, save_every=1, keep_checkpoints=2)).run()
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step-0000003", "step-0000004"]
