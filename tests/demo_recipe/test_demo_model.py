"""The demo's tokenizer (deterministic, Llama-style ids, loads through mlx-lm) and its config."""

import json

import cumo_mlx
import mlx.core as mx
import numpy as np
import pytest
from cumo_mlx import shapes
from cumo_mlx.loader import load_processor
from cumo_mlx.models.config import ModelArgs
from cumo_mlx.models.model import Model
from cumo_mlx.prompt import IMAGE_TOKEN_INDEX, chat_prompt, plain_prompt
from cumo_mlx.routes import moe_layers
from demo_model import (
    COLOUR_DIMS,
    NUM_EXPERTS,
    TOP_K,
    build_tokenizer,
    demo_config,
    edge_energy_init,
    edge_patterns,
    tokenizer_corpus,
    write_initial_model,
    write_tokenizer,
)


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    directory = write_tokenizer(tmp_path_factory.mktemp("demo-tokenizer"))
    return load_processor(directory, ModelArgs.from_dict(demo_config()))


def test_tokenizer_is_deterministic(tmp_path):
    write_tokenizer(tmp_path / "a")
    write_tokenizer(tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_special_token_ids():
    vocab = build_tokenizer().get_vocab()
    assert (vocab["<unk>"], vocab["<s>"], vocab["</s>"]) == (0, 1, 2)
    assert vocab["<0x00>"] == 3 and vocab["<0xFF>"] == 258


def test_loads_through_mlx_lm_and_the_processor(processor):
    tokenizer = processor.tokenizer
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    assert tokenizer.unk_token_id == 0
    ids = processor.tokenize(chat_prompt(["<image>\nWhat shape is this?"]))
    assert ids[:2] == [1, 1]  # the template's <s> and the tokenizer's BOS, as in the original
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    assert processor.tokenize(plain_prompt())[:2] == [1, IMAGE_TOKEN_INDEX]
    answer = tokenizer.encode("Is there an orange star?", add_special_tokens=False)
    assert processor.decode(answer) == "Is there an orange star?"


def test_every_word_of_the_dataset_is_one_token(processor):
    tokenizer = processor.tokenizer
    words = {*shapes.SHAPES, *shapes.COLOURS, *shapes.COUNT_WORDS.values(), "yes", "no"}
    for word in words:  # an answer as the template writes it: " {answer} </s>"
        pieces = tokenizer.encode(f" {word}", add_special_tokens=False)
        assert len(pieces) == 2 and tokenizer.decode(pieces[1:]).strip() == word, word  # "▁", "▁word"
        assert len(tokenizer.encode(word, add_special_tokens=False)) == 1, word
    for text in tokenizer_corpus():
        assert 0 not in tokenizer.encode(text)  # no <unk>


def test_any_text_round_trips(processor):
    tokenizer = processor.tokenizer
    text = "Zebra: 42 ünïcode ✓ and\ttabs"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert 0 not in ids and tokenizer.decode(ids) == text


def test_streaming_detokenizer_is_the_sentencepiece_one(processor):
    from mlx_lm.tokenizer_utils import SPMStreamingDetokenizer

    detokenizer = processor.tokenizer.detokenizer
    assert isinstance(detokenizer, SPMStreamingDetokenizer)
    detokenizer.reset()
    for token in processor.tokenizer.encode("A red circle and an orange star.", add_special_tokens=False):
        detokenizer.add_token(token)
    detokenizer.finalize()
    assert detokenizer.text == "A red circle and an orange star."


def test_demo_configs():
    dense = ModelArgs.from_dict(demo_config(moe=False))
    moe = ModelArgs.from_dict(demo_config(moe=True))
    assert dense.model_type == "llava_mistral" and not dense.clip_smoe and not dense.connector_is_moe
    assert moe.clip_smoe and moe.connector_is_moe and (moe.num_experts, moe.num_selected) == (NUM_EXPERTS, TOP_K)
    assert dense.text_config.vocab_size == build_tokenizer().get_vocab_size()
    assert [layer.name for layer in moe_layers(Model(moe))] == ["vision.0", "vision.1", "vision.2", "connector"]
    assert moe_layers(Model(dense)) == []


def test_edge_energy_init_does_not_see_which_colour_is_where():
    """CLIP's starting point: swapping a shape's and its background's colours negates the patch
    embedding's edge responses, and the first MLP's energy outputs stay the same (and are nonzero on
    the shape's outline only)."""
    model = Model(ModelArgs.from_dict(demo_config(moe=False)))
    clip = model.vision_tower.vision_model
    edge_energy_init(clip, seed=0)
    size, patch = clip.config.image_size, clip.config.patch_size
    red, blue = mx.array([1.5, -1.0, -0.8]), mx.array([-1.2, -0.3, 1.9])
    square = np.zeros((size, size, 1), np.float32)
    square[30:70, 30:70] = 1.0  # edges at 30 and 70: inside patches 2 and 5 of 8
    square = mx.array(square)
    images = [bg * (1 - square) + fg * square for fg, bg in ((red, blue), (blue, red))]
    tokens = [clip.embeddings.patch_embedding(image[None]).reshape(-1, clip.config.hidden_size) for image in images]
    edges = slice(COLOUR_DIMS, COLOUR_DIMS + 3 * len(edge_patterns(patch)))
    assert mx.allclose(tokens[0][:, edges], -tokens[1][:, edges], atol=1e-5)
    energies = slice(edges.stop, edges.stop + len(edge_patterns(patch)))
    for_energy = [mx.concatenate([mx.zeros_like(t[:, :edges.start]), t[:, edges], mx.zeros_like(t[:, edges.stop:])], 1) for t in tokens]
    out = [clip.encoder.layers[0].mlp(t)[:, energies] for t in for_energy]
    assert mx.allclose(out[0], out[1], atol=1e-4)
    strength = np.array(mx.abs(out[0]).sum(1)).reshape(8, 8)
    on_outline = np.zeros((8, 8), bool)
    on_outline[2:6, [2, 5]] = on_outline[[2, 5], 2:6] = True
    assert strength[on_outline].min() > 10 * strength[~on_outline].max()


def test_initial_model_loads_and_runs(tmp_path):
    directory = write_initial_model(tmp_path / "init")
    config = json.loads((directory / "config.json").read_text())
    assert config["mm_projector_type"] == "mlp2x_gelu" and config["clip_smoe"] is False
    model, processor = cumo_mlx.load(directory)
    image = shapes.make_sample(0, 0).image
    ids = processor.tokenize(chat_prompt(["<image>\nWhat shape is this?"]))
    logits = model(ids, processor.preprocess_images([image]))
    assert logits.shape == (1, len(ids) - 1 + model.args.image_tokens, config["vocab_size"])
    assert mx.isfinite(logits).all().item()
