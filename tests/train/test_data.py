"""Training data: prompts and label masks as the original builds them, batching, order, bad samples."""

import json

import cumo_mlx
import numpy as np
import pytest
from cumo_mlx.errors import DataError
from cumo_mlx.prompt import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from cumo_mlx.train.data import (
    Dataset,
    build_prompt,
    collate,
    epoch_batches,
    shard,
    tokenize_with_labels,
)
from tiny_data import caption_samples, instruct_samples, write_dataset, write_images

IMAGE_TOKENS = 16  # tiny CLIP: 16 px / 4 px patches


@pytest.fixture(scope="module")
def processor(tiny_mlx_model_dir):
    return cumo_mlx.load(tiny_mlx_model_dir)[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    return folder, write_images(folder)


def original_llama2_labels(tokenize, conversation: str, ids: list) -> list:
    """The original's `preprocess_llama_2` masking (rounds split at </s>, instructions at "[/INST] ")."""
    target = list(ids)
    target[:1] = [IGNORE_INDEX]
    cur = 1
    for round_text in conversation.split("</s>"):
        if round_text == "":
            break
        parts = round_text.split("[/INST] ")
        if len(parts) != 2:
            break
        parts[0] += "[/INST] "
        round_len = len(tokenize(round_text))
        instruction_len = len(tokenize(parts[0])) - 2
        target[cur : cur + instruction_len] = [IGNORE_INDEX] * len(target[cur : cur + instruction_len])
        cur += round_len
    target[cur:] = [IGNORE_INDEX] * len(target[cur:])
    assert cur == len(ids), "the original would have flagged a tokenization mismatch"
    return [t if t >= 0 else IGNORE_INDEX for t in target]


def supervised_pieces(processor, ids, labels) -> list:
    """The supervised runs of tokens, as token strings."""
    convert = processor.tokenizer._tokenizer.convert_ids_to_tokens
    runs, current = [], []
    for i, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == i
            current.append(convert(i))
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


TURNS = [
    ("human", "<image>\nWhat shape is this?"),
    ("gpt", "circle"),
    ("human", "What colour is the circle?"),
    ("gpt", "It is red."),
    ("human", "How many shapes are there?"),
    ("gpt", "three"),
]


def test_plain_mask_supervises_caption_and_newline(processor):
    text, spans = build_prompt([("human", "<image>\nDescribe it."), ("gpt", "a red circle")], "plain")
    assert text == "<image>a red circle\n"
    ids, labels = tokenize_with_labels(processor.tokenize, text, spans)
    caption = processor.tokenize("a red circle\n")[1:]  # the chunk after <image>, its BOS dropped
    assert ids == [1, IMAGE_TOKEN_INDEX] + caption
    # the original masks len(tokenizer_image_token("<image>")) = 2 positions
    assert labels == [IGNORE_INDEX, IGNORE_INDEX] + caption


def test_single_turn_mask(processor):
    text, spans = build_prompt(TURNS[:2], "mistral_instruct_system")
    assert text.startswith("<s>[INST] <<SYS>>\n") and text.endswith("<image>\nWhat shape is this? [/INST] circle </s>")
    ids, labels = tokenize_with_labels(processor.tokenize, text, spans)
    assert ids[:2] == [1, 1] and ids.count(IMAGE_TOKEN_INDEX) == 1
    assert labels == original_llama2_labels(processor.tokenize, text, ids)
    assert supervised_pieces(processor, ids, labels) == [["▁circle", "▁", "</s>"]]


def test_multi_turn_mask(processor):
    text, spans = build_prompt(TURNS, "mistral_instruct_system")
    assert "circle </s>[INST] What colour is the circle? [/INST] It is red. </s>[INST]" in text
    ids, labels = tokenize_with_labels(processor.tokenize, text, spans)
    assert labels == original_llama2_labels(processor.tokenize, text, ids)
    pieces = supervised_pieces(processor, ids, labels)
    assert len(pieces) == 3 and all(p[-1] == "</s>" for p in pieces)
    decode = processor.tokenizer._tokenizer.convert_tokens_to_string
    assert [decode(p[:-1]).strip() for p in pieces] == ["circle", "It is red.", "three"]


def test_image_moves_to_the_front_of_its_turn(processor):
    text, _ = build_prompt([("human", "What is this? <image>"), ("gpt", "a star")], "mistral_instruct_system")
    assert "<</SYS>>\n\n<image>\nWhat is this? [/INST]" in text


def test_text_only_sample_has_no_placeholder(processor):
    text, spans = build_prompt([("human", "How many?"), ("gpt", "three")], "mistral_instruct_system")
    ids, labels = tokenize_with_labels(processor.tokenize, text, spans)
    assert IMAGE_TOKEN_INDEX not in ids
    assert labels == original_llama2_labels(processor.tokenize, text, ids)


def test_collate_splices_pads_and_truncates(processor, images, tmp_path):
    folder, names = images
    samples = instruct_samples(names)
    samples.append({"id": "two", "image": [names["red"], names["blue"]], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nWhich is red?"}, {"from": "gpt", "value": "the first"}]})
    data = Dataset(write_dataset(tmp_path, samples), processor, folder)
    items = data.load([len(samples) - 1, len(samples) - 2, 0])  # two images, text only, one image
    encoded = [e for _, e in items]
    batch = collate(encoded, IMAGE_TOKENS, max_length=None, pad_id=0)
    assert batch.num_images == 3 and batch.pixels.shape == (3, 16, 16, 3)
    width = max(batch.lengths)
    for row, e in enumerate(encoded):
        n_img = e.ids.count(IMAGE_TOKEN_INDEX)
        assert batch.lengths[row] == len(e.ids) + n_img * (IMAGE_TOKENS - 1)
        assert (batch.tokens[row, batch.lengths[row] :] == 0).all()  # right padding with unk
        assert (batch.image_rows[row, batch.lengths[row] :] == -1).all()
    # rows of the flattened image features, in order: row 0's two images, then row 2's one
    positions = np.flatnonzero(batch.image_rows[0] >= 0)
    assert positions[0] == encoded[0].ids.index(IMAGE_TOKEN_INDEX)
    assert batch.image_rows[0][positions].tolist() == list(range(2 * IMAGE_TOKENS))
    assert batch.image_rows[2][batch.image_rows[2] >= 0].tolist() == list(range(2 * IMAGE_TOKENS, 3 * IMAGE_TOKENS))
    assert (batch.image_rows[1] == -1).all()
    # targets: the labels shifted by one, at the positions that predict them
    flat_inputs = np.asarray(batch.inputs)
    assert (flat_inputs // width < 3).all()
    expected = sum(sum(1 for label in e.labels if label != IGNORE_INDEX) for e in encoded)
    assert batch.num_targets == expected
    # truncation keeps the first positions
    short = collate(encoded, IMAGE_TOKENS, max_length=40, pad_id=0)
    assert max(short.lengths) == 40 and np.array_equal(short.tokens, batch.tokens[:, :40])


def test_epoch_order_is_seeded_sorted_and_sharded():
    lengths = [5, 1, 9, 3, 7, 2, 8]
    a = epoch_batches(lengths, 3, seed=0, epoch=0, sort_by_length=False)
    assert a == epoch_batches(lengths, 3, seed=0, epoch=0, sort_by_length=False)
    assert a != epoch_batches(lengths, 3, seed=0, epoch=1, sort_by_length=False)
    assert sorted(i for b in a for i in b) == list(range(7)) and [len(b) for b in a] == [3, 3, 1]
    s = epoch_batches(lengths, 3, seed=0, epoch=0, sort_by_length=True)
    assert sorted(map(sorted, s)) == sorted(map(sorted, [[1, 5, 3], [0, 4, 6], [2]]))
    # the sorted batches come in a seeded random order: not always by length, and another each epoch
    orders = [epoch_batches(lengths, 3, seed=0, epoch=e, sort_by_length=True) for e in range(6)]
    assert len({str(o) for o in orders}) > 1 and any(o[0] != [1, 5, 3] for o in orders)
    batch = a[0]
    assert shard(batch, 0, 2) + shard(batch, 1, 2) == batch[0::2] + batch[1::2]


# ---------------------------------------------------------------------------------------------
# Bad data
# ---------------------------------------------------------------------------------------------


def bad_samples(folder, names):
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    good = instruct_samples(names)[0]
    return [
        good,
        {"id": "missing", "image": "nowhere.png", "conversations": good["conversations"]},
        {"id": "corrupt", "image": "corrupt.png", "conversations": good["conversations"]},
        {"id": "nohuman", "conversations": [{"from": "gpt", "value": "hi"}, {"from": "gpt", "value": "there"}]},
        {"id": "count", "image": names["red"], "conversations": [{"from": "human", "value": "no placeholder"}, {"from": "gpt", "value": "x"}]},
        {"id": "escape", "image": "../outside.png", "conversations": good["conversations"]},
        {"id": "absolute", "image": "/etc/passwd", "conversations": good["conversations"]},
    ]


def test_bad_samples_are_reported_and_skipped(processor, images, tmp_path):
    folder, names = images
    (folder.parent / "outside.png").write_bytes((folder / names["red"]).read_bytes())
    messages = []
    data = Dataset(write_dataset(tmp_path, bad_samples(folder, names)), processor, folder, report=messages.append)
    # structural problems and missing files are found up front; a corrupt file when it is loaded
    assert [s.id for s in data.samples] == ["red-0", "corrupt"]
    assert len(messages) == 5
    text = "\n".join(messages)
    assert "'missing'" in text and "image file not found" in text
    assert "'nohuman'" in text and "no human turn" in text
    assert "'count'" in text and "0 <image> placeholder(s) but 1 image(s)" in text
    assert "'escape'" in text and "'absolute'" in text and "outside the image folder" in text
    loaded = data.load([0, 1])
    assert [s.id for s, _ in loaded] == ["red-0"]
    assert "'corrupt'" in messages[-1] and "cannot read" in messages[-1]
    assert len(data.bad) == 6
    data.load([1])
    assert len(messages) == 6  # reported once


def test_strict_makes_a_bad_sample_fatal(processor, images, tmp_path):
    folder, names = images
    path = write_dataset(tmp_path, bad_samples(folder, names)[:2])
    with pytest.raises(DataError, match="'missing'.*image file not found"):
        Dataset(path, processor, folder, strict=True)


def test_corrupt_image_is_fatal_when_strict(processor, images, tmp_path):
    folder, names = images
    path = write_dataset(tmp_path, bad_samples(folder, names)[2:3])
    data = Dataset(path, processor, folder, strict=True)
    with pytest.raises(DataError, match="'corrupt'"):
        data.load([0])


@pytest.mark.parametrize(
    "content, message",
    [
        ("[]", "holds no samples"),
        ("{not json", "not valid JSON"),
        ('[{"id": 1, "conversations": []}]', "no usable samples"),
        ("42", "must hold a JSON list"),
    ],
)
def test_unusable_data_files(processor, tmp_path, content, message):
    path = tmp_path / "data.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        Dataset(path, processor, None, report=None)


def test_missing_data_file_and_image_folder(processor, tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        Dataset(tmp_path / "none.json", processor)
    path = write_dataset(tmp_path, caption_samples({"red": "red.png"}))
    with pytest.raises(DataError, match="image folder not found"):
        Dataset(path, processor, tmp_path / "no-folder")


def test_plain_template_rules(processor, images, tmp_path):
    folder, names = images
    samples = caption_samples(names)[:1] + [
        {"id": "textonly", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]}
    ]
    messages = []
    data = Dataset(write_dataset(tmp_path, samples), processor, folder, template="plain", report=messages.append)
    assert len(data) == 1 and "needs an image" in messages[0]


def test_jsonl_and_role_aliases(processor, images, tmp_path):
    folder, names = images
    path = tmp_path / "data.jsonl"
    record = {"image": names["red"], "conversations": [
        {"from": "user", "value": "<image>\nColour?"}, {"from": "assistant", "value": "red"}]}
    path.write_text(json.dumps(record) + "\n" + json.dumps(record) + "\n")
    data = Dataset(path, processor, folder)
    assert len(data) == 2 and data.samples[0].turns[0][0] == "human"
