"""The demo recipe's probes run (`--quick`) and compute what their READMEs say they do."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from test_benchmarks import run as run_script

DEMO_RECIPE = Path(__file__).resolve().parents[2] / "demo_recipe"


def run(name: str, *args: str) -> dict:
    return run_script(name, *args, folder=DEMO_RECIPE)


def test_binding_probe():
    result = run("binding_probe")
    assert result["steps"] == 6 and result["heads"] > 0 and result["kv_heads"] > 0
    first, last = result["loss_first_last"]
    assert last < first  # the LLM learns from the ideal features
    accuracy = result["accuracy"]
    assert accuracy["overall"]["total"] == 12 and len(accuracy) > 1
    assert sum(row["total"] for kind, row in accuracy.items() if kind != "overall") == 12
    assert all(0 <= row["accuracy"] <= 1 for row in accuracy.values())
    assert result["seed"] == 0 and result["input"] == "ideal image features"
    reseeded = run("binding_probe", "--seed", "1")  # another initial LLM: another first loss
    assert reseeded["seed"] == 1 and reseeded["loss_first_last"][0] != first


def test_binding_probe_reads_a_models_clip_features_through_a_fresh_connector(tmp_path):
    from demo_model import write_initial_model

    model = write_initial_model(tmp_path / "model", seed=0)
    result = run("binding_probe", "--features", str(model))
    assert result["input"] == f"CLIP features of {model}"
    first, last = result["loss_first_last"]
    assert last < first  # the connector and LLM learn from the features
    assert result["accuracy"]["overall"]["total"] == 12


def test_binding_probe_with_a_connector_reads_the_features_through_it():
    binding_probe = import_probe("binding_probe")
    import mlx.core as mx
    import numpy as np
    from cumo_mlx.models.config import ModelArgs
    from cumo_mlx.models.model import Model
    from demo_model import demo_config

    model = Model(ModelArgs.from_dict(demo_config(vocab_size=300)))
    probe = binding_probe.Probe(model.language_model, model.mm_projector)
    assert probe.features is model.mm_projector  # trained with the LLM, not ideal-feature tables
    patches, width = binding_probe.GRID**2, model.args.mm_hidden_size * len(model.args.scales)
    tokens = mx.array([[1] + [0] * patches + [5, 6]])
    rows = mx.array([[-1, *range(patches), -1, -1]])
    features = np.zeros((1, patches, width), np.float32)
    other = features.copy()
    other[0, 10, :] = 1.0  # one patch's features
    base = probe.hidden(tokens, rows, mx.array(features))[0, -1]
    assert not mx.allclose(base, probe.hidden(tokens, rows, mx.array(other))[0, -1]).item()


def test_clip_features_are_the_vision_towers_output(tmp_path):
    binding_probe = import_probe("binding_probe")
    import cumo_mlx
    import mlx.core as mx
    import numpy as np
    from cumo_mlx.shapes import write_dataset
    from demo_model import write_initial_model

    write_dataset(tmp_path / "data", 3, seed=0, progress=False)
    model_dir = write_initial_model(tmp_path / "model", seed=0)
    features = binding_probe.clip_features(model_dir, tmp_path / "data", batch_size=2)  # batches of 2 and 1
    model, processor = cumo_mlx.load(model_dir)
    assert sorted(features) == sorted(binding_probe.read_scenes(tmp_path / "data"))
    for name, got in features.items():
        pixels = mx.array(processor.preprocess_image(tmp_path / "data" / name))[None]
        expected = np.array(model.vision_tower(pixels)[0][0])
        assert got.shape == (binding_probe.GRID**2, expected.shape[-1])
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_binding_probe_ideal_features_of_chosen_labels_only():
    binding_probe = import_probe("binding_probe")
    import mlx.core as mx
    import numpy as np

    features = binding_probe.IdealFeatures(16, labels=("colour", "shape"))
    labels = np.zeros((1, 4, len(binding_probe.TARGETS)), np.int32)
    base = features(mx.array(labels))
    changed = labels.copy()
    changed[0, 1, binding_probe.TARGET_NAMES.index("shape")] = 2
    assert not mx.allclose(base, features(mx.array(changed))).item()
    ignored = labels.copy()
    ignored[0, 1, binding_probe.TARGET_NAMES.index("pair")] = 7  # not among the labels: not read
    assert mx.allclose(base, features(mx.array(ignored))).item()

    result = run("binding_probe", "--labels", "colour,shape")
    assert result["input"] == "ideal image features (colour, shape)"


def test_binding_probe_kind_noise_randomises_only_covered_patches_kinds(tmp_path):
    binding_probe = import_probe("binding_probe")
    import numpy as np
    from cumo_mlx.shapes import write_dataset

    write_dataset(tmp_path / "data", 40, seed=0, progress=False)
    labels = np.concatenate([binding_probe.scene_labels(s) for s in binding_probe.read_scenes(tmp_path / "data").values()])
    kind = binding_probe.TARGET_NAMES.index("shape")
    covered = labels[:, kind] < len(binding_probe.SHAPES)
    noisy = binding_probe.with_kind_noise(labels, 0.5, np.random.default_rng(0))
    others = [j for j in range(labels.shape[1]) if j != kind]
    assert (noisy[:, others] == labels[:, others]).all() and (noisy[~covered] == labels[~covered]).all()
    changed = (noisy[covered, kind] != labels[covered, kind]).mean()
    assert 0.3 < changed < 0.45  # half are drawn again, a quarter of those draw the same kind
    assert (noisy[covered, kind] < len(binding_probe.SHAPES)).all()
    assert (binding_probe.with_kind_noise(labels, 0.0, np.random.default_rng(0)) == labels).all()


def test_binding_probe_rejects_bad_flags_in_one_line():
    for flags, message in (
        (["--labels", "colour,hue"], "unknown --labels hue"),
        (["--kind-noise", "1.5"], "--kind-noise is a share"),
        (["--text", "--features", "somewhere"], "give one"),
    ):
        command = [sys.executable, str(DEMO_RECIPE / "binding_probe.py"), "--quick", *flags]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def import_probe(name: str):
    return importlib.import_module(name)  # demo_recipe/ is on sys.path (conftest)


def test_binding_probe_text_puts_the_caption_in_place_of_the_image(tmp_path):
    binding_probe = import_probe("binding_probe")
    from cumo_mlx.loader import load_processor
    from cumo_mlx.models.config import ModelArgs
    from cumo_mlx.prompt import IMAGE_TOKEN_INDEX
    from cumo_mlx.shapes import write_dataset
    from demo_model import demo_config, write_tokenizer

    write_dataset(tmp_path / "data", 6, seed=0, progress=False)
    processor = load_processor(write_tokenizer(tmp_path / "tokenizer"), ModelArgs.from_dict(demo_config()))
    scenes = list(binding_probe.read_scenes(tmp_path / "data").values())
    with_images = binding_probe.training_samples(tmp_path / "data", processor, text=False)
    with_text = binding_probe.training_samples(tmp_path / "data", processor, text=True)
    for scene, (image, _), (text, labels) in zip(scenes, with_images, with_text, strict=True):
        assert image.ids.count(IMAGE_TOKEN_INDEX) == 1 and IMAGE_TOKEN_INDEX not in text.ids
        at = image.ids.index(IMAGE_TOKEN_INDEX)  # the caption starts where the image was, the rest is the same
        assert processor.tokenizer.decode(text.ids[at:]).startswith(binding_probe.caption(scene) + "\n")
        rest = image.ids[at + 2 :]  # from the newline after the image (a "▁" piece comes between)
        assert text.ids[-len(rest) :] == rest
        assert (labels == binding_probe.scene_labels(scene)).all()


def test_binding_probe_reads_the_labels_at_the_image_rows():
    binding_probe = import_probe("binding_probe")
    import mlx.core as mx
    import numpy as np
    from cumo_mlx.models.config import ModelArgs
    from cumo_mlx.models.model import Model
    from demo_model import demo_config

    probe = binding_probe.Probe(Model(ModelArgs.from_dict(demo_config(vocab_size=300))).language_model)
    patches, targets = binding_probe.GRID**2, len(binding_probe.TARGETS)
    tokens = mx.array([[1] + [0] * patches + [5, 6]])
    rows = mx.array([[-1, *range(patches), -1, -1]])
    labels = np.zeros((1, patches, targets), np.int32)
    other = labels.copy()
    other[0, 10, 0] = 3  # one patch's colour
    base = probe.hidden(tokens, rows, mx.array(labels))[0, -1]
    assert not mx.allclose(base, probe.hidden(tokens, rows, mx.array(other))[0, -1]).item()
    filled = mx.array([[1] + [7] * patches + [5, 6]])  # the ids under image rows are not read
    assert mx.allclose(base, probe.hidden(filled, rows, mx.array(labels))[0, -1]).item()


def test_lookup_probe():
    result = run("lookup_probe", "--prompt", "demo", "--layers", "1")
    assert result["prompt"] == "demo" and result["layers"] == 1 and result["questions"] == 1
    curve = result["heldout_accuracy"]
    assert list(curve) == [str(step) for step in range(1, 7)]  # checked after every step of the 6
    assert all(0.0 <= share <= 1.0 for share in curve.values())
    assert len(set(curve.values())) > 1  # the LLM changes as it trains


def test_lookup_probe_exists_task_with_captions():
    result = run("lookup_probe", "--task", "exists", "--caption-every", "2", "--layers", "1")
    assert result["task"] == "exists" and result["caption_every"] == 2
    assert len(set(result["heldout_accuracy"].values())) > 1


def test_lookup_probe_trains_on_captions_every_kth_step(monkeypatch):
    p = import_probe("lookup_probe")
    asked, make = [], p.make_sequences
    monkeypatch.setattr(p, "make_sequences", lambda *a: asked.append(a[5]) or make(*a))
    p.train_and_score(4, 2, 1e-3, 1, 16, 8, 0, 1, "bare", 0, task="exists", caption_every=2, checks=1)
    assert asked[1:] == ["exists", "caption", "exists", "caption"]  # after the held-out set (exists)


@pytest.mark.parametrize("prompt", ["bare", "demo"])
def test_lookup_probe_exists_answers_say_whether_the_pair_is_drawn(prompt):
    import numpy as np

    p = import_probe("lookup_probe")
    rows, answers = p.make_sequences(np.random.default_rng(0), 200, 64, 2, prompt, "exists")
    start = 1 if prompt == "bare" else len(p.DEMO_PREFIX)
    replies = []
    for row, answer in zip(rows, answers):
        drawn = {((t - p.PATCH0) % p.COLOURS, (t - p.PATCH0) // p.COLOURS) for t in row[start : start + 64] if t >= p.PATCH0}
        for at in np.flatnonzero(answer):
            back = 2 if prompt == "bare" else 3  # the shape word; the colour word just before it
            colour, shape = row[at - back - 1] - p.COLOUR0, row[at - back] - p.SHAPE0
            assert 0 <= colour < p.COLOURS and 0 <= shape < p.SHAPES
            assert row[at] == (p.YES if (colour, shape) in drawn else p.NO)
            replies.append(row[at])
    assert 0.4 < replies.count(p.YES) / len(replies) < 0.6


def test_lookup_probe_captions_list_the_pairs_in_reading_order():
    import numpy as np

    p = import_probe("lookup_probe")
    rows, answers = p.make_sequences(np.random.default_rng(0), 20, 64, 1, "bare", "caption")
    for row, answer in zip(rows, answers):
        image, words = row[1:65], row[66:]
        assert row[65] == p.DESCRIBE and answer[66:].all() and not answer[:66].any()
        firsts = []
        for t in image:
            if t >= p.PATCH0 and t not in firsts:
                firsts.append(t)
        pairs = [(p.COLOUR0 + (t - p.PATCH0) % p.COLOURS, p.SHAPE0 + (t - p.PATCH0) // p.COLOURS) for t in firsts]
        assert [tuple(words[i : i + 2]) for i in range(0, len(words), 2)] == pairs


@pytest.mark.parametrize("prompt", ["bare", "demo"])
def test_lookup_probe_answers_are_the_colour_bound_to_the_asked_shape(prompt):
    import numpy as np

    p = import_probe("lookup_probe")
    rows, answers = p.make_sequences(np.random.default_rng(0), 50, 64, 3, prompt)
    start = 1 if prompt == "bare" else len(p.DEMO_PREFIX)
    assert answers.sum() == 150 and (rows[:, :start] == (p.DEMO_PREFIX if prompt == "demo" else [p.BOS])).all()
    for row, answer in zip(rows, answers):
        image = row[start : start + 64]
        bound = {(t - p.PATCH0) // p.COLOURS: (t - p.PATCH0) % p.COLOURS for t in image if t >= p.PATCH0}
        assert len(bound) == p.SHAPES_A_SCENE and (image == p.BACKGROUND).sum() >= 64 - 3 * p.MOST_PATCHES
        for at in np.flatnonzero(answer):
            shape = row[at - (2 if prompt == "bare" else 3)]  # the shape word, two or three tokens back
            assert row[at] - p.COLOUR0 == bound[shape - p.SHAPE0]
