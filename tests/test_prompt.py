"""Prompt construction: the templates' exact strings (the original's: SHI-Labs/CuMo, cumo/conversation.py),
and the prompt ids.

The ids are checked against a re-implementation, written here, of what the original does: LLaVA's
`tokenizer_image_token` (split at `<image>`, tokenize every chunk with BOS, keep the first BOS
once, -200 between chunks) over transformers' slow `LlamaTokenizer` (the original loads the
tokenizer with use_fast=False), itself re-implemented on the `sentencepiece` package, since
transformers 5 no longer has it. Models load through `cumo_mlx.load`.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from tiny_models import tiny_config, write_mlx_model, write_tokenizer
from transformers import AutoTokenizer

import cumo_mlx
from cumo_mlx.errors import CuMoError
from cumo_mlx.prompt import (
    DEFAULT_SYSTEM,
    chat_prompt,
    check_placeholders,
    plain_prompt,
    user_turn,
    with_image_placeholders,
)

IMAGE = -200
SYSTEM_BLOCK = f"<<SYS>>\n{DEFAULT_SYSTEM}\n<</SYS>>\n\n"

# ---------------------------------------------------------------- exact strings


def test_system_text():
    assert DEFAULT_SYSTEM == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions."
    )


def test_single_turn():
    prompt = chat_prompt([with_image_placeholders("What shape is this?", 1)])
    assert prompt == (
        "<s>[INST] <<SYS>>\nA chat between a curious user and an artificial intelligence assistant. The "
        "assistant gives helpful, detailed, and polite answers to the user's questions.\n<</SYS>>\n\n"
        "<image>\nWhat shape is this? [/INST]"
    )


def test_multi_turn():
    messages = ["<image>\nWhat shape is this?", "A red circle.", "How many shapes are there?", "Two.", "What colour is it?"]
    assert chat_prompt(messages) == (
        f"<s>[INST] {SYSTEM_BLOCK}<image>\nWhat shape is this? [/INST] A red circle. </s>"
        "[INST] How many shapes are there? [/INST] Two. </s>"
        "[INST] What colour is it? [/INST]"
    )
    # a finished conversation ends with the last answer's </s>
    assert chat_prompt(messages[:2]) == f"<s>[INST] {SYSTEM_BLOCK}<image>\nWhat shape is this? [/INST] A red circle. </s>"
    assert chat_prompt(messages).count("<<SYS>>") == 1 and chat_prompt(messages).count("<s>") == 1


def test_turns_one_by_one_equal_the_whole_prompt():
    first = user_turn("<image>\nWhat shape is this?", first=True)
    second = user_turn("And the colour?", first=False)
    assert first + " A red circle. </s>" + second == chat_prompt(["<image>\nWhat shape is this?", "A red circle.", "And the colour?"])
    assert second == "[INST] And the colour? [/INST]"


def test_text_only():
    assert chat_prompt([with_image_placeholders("What colour is the sky?", 0)]) == (
        f"<s>[INST] {SYSTEM_BLOCK}What colour is the sky? [/INST]"
    )


def test_no_system():
    assert chat_prompt(["<image>\nHi", "Hello.", "Bye"], system=None) == "<s>[INST] <image>\nHi [/INST] Hello. </s>[INST] Bye [/INST]"
    assert chat_prompt(["Hi"], system="") == "<s>[INST] Hi [/INST]"


def test_plain():
    assert plain_prompt("A red circle on white.") == "<image>A red circle on white.\n"
    assert plain_prompt() == "<image>"  # for generation: the caption follows


def test_with_image_placeholders():
    assert with_image_placeholders("What is it?", 1) == "<image>\nWhat is it?"
    assert with_image_placeholders("Compare them.", 3) == "<image>\n<image>\n<image>\nCompare them."
    assert with_image_placeholders("No image.", 0) == "No image."
    assert with_image_placeholders("Left <image> right <image>", 2) == "Left <image> right <image>"  # placed by the user
    assert with_image_placeholders("<image>\nWhat?", 1) == "<image>\nWhat?"


@pytest.mark.parametrize("text, images", [("<image> and <image>", 1), ("<image>", 2), ("<image>", 0), ("<image><image><image>", 2)])
def test_placeholder_mismatch(text, images):
    with pytest.raises(CuMoError, match=f"{text.count('<image>')} <image> placeholder.*{images} image"):
        with_image_placeholders(text, images)


def test_placeholder_check_on_prompt_ids():
    check_placeholders([1, IMAGE, 5, IMAGE], 2)
    check_placeholders([1, 5], 0)
    with pytest.raises(CuMoError, match=r"1 image placeholder\(s\) but 0 image"):
        check_placeholders([1, IMAGE, 5], 0)


def test_token_id_check():
    """Ids given as such are ints inside the vocabulary or the image placeholder: the embedding lookup
    does not check its indices."""
    import numpy as np

    from cumo_mlx.prompt import check_token_ids

    assert check_token_ids([1, IMAGE, np.int64(9), 9], 10) == [1, IMAGE, 9, 9]
    for ids, message in (([10], "prompt id\\(s\\) 10 outside the vocabulary of 10 tokens"), ([-1], "-1 outside"),
                         ([-201], "outside"), ([2**70], "outside"), ([1.0], "1.0 is not an integer"),
                         ([False], "False is not an integer"), ([None], "None is not an integer")):  # fmt: skip
        with pytest.raises(CuMoError, match=message):
            check_token_ids(ids, 10)


# ---------------------------------------------------------------- the original's ids, re-implemented


class SlowLlamaTokenizer:
    """transformers' slow LlamaTokenizer (4.x), as the original ran it, on the sentencepiece package."""

    SPECIALS = {"<unk>": 0, "<s>": 1, "</s>": 2}

    def __init__(self, model_file: Path, legacy: bool):
        proto = Path(model_file).read_bytes()
        if not legacy:  # LlamaTokenizer.get_spm_processor: no dummy prefix when not legacy
            model = sentencepiece_model_pb2.ModelProto()
            model.ParseFromString(proto)
            model.normalizer_spec.add_dummy_prefix = False
            proto = model.SerializeToString()
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        self.legacy = legacy
        self.unk_token_length = len(self.sp.encode("<unk>"))

    def _tokenize(self, text: str) -> list[int]:  # LlamaTokenizer._tokenize
        if self.legacy or not text.startswith(("\u2581", " ")):
            return self.sp.encode(text)
        ids = self.sp.encode("<unk>" + text)
        return ids[self.unk_token_length :] if len(ids) >= self.unk_token_length else ids

    def __call__(self, text: str) -> list[int]:
        if not self.legacy and len(text) > 0:  # LlamaTokenizer.tokenize
            text = "\u2581" + text.replace("\u2581", " ")
        # PreTrainedTokenizer.tokenize: split at the added tokens (no strip: lstrip/rstrip are False)
        tokens = [t for t in re.split("(<unk>|<s>|</s>)", text) if t]
        if not self.legacy and len(tokens) > 1 and tokens[0] == "\u2581" and tokens[1] in self.SPECIALS:
            tokens = tokens[1:]
        ids = []
        for token in tokens:
            ids += [self.SPECIALS[token]] if token in self.SPECIALS else self._tokenize(token)
        return [1] + ids  # build_inputs_with_special_tokens: BOS, no EOS


def tokenizer_image_token(prompt: str, tokenize, bos_token_id: int = 1, image_token_index: int = IMAGE) -> list[int]:
    """LLaVA's (and CuMo's) splice, step for step."""
    prompt_chunks = [tokenize(chunk) for chunk in prompt.split("<image>")]

    def insert_separator(chunks, sep):
        return [element for sublist in zip(chunks, [sep] * len(chunks)) for element in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


TEMPLATE_PROMPTS = {
    "single-turn": chat_prompt(["<image>\nWhat shape is this?"]),
    "multi-turn": chat_prompt(["<image>\nWhat shape is this?", "A red circle.", "How many shapes are there?", "two", "What color is it?"]),
    "text-only": chat_prompt(["Describe a circle in detail."]),
    "two-images": chat_prompt([with_image_placeholders("What colour is the circle?", 2)]),
    "no-system": chat_prompt(["<image>\nIs there a red circle?", "yes"], system=None),
    "plain": plain_prompt("A red circle and a blue square."),
    "plain-generation": plain_prompt(),
}
# Pieces that start with a space right after `<image>` or a special token: transformers 5's
# tokenizers-based LlamaTokenizer gives one "▁" fewer there than the original's slow one.
SPACE_PROMPTS = {
    "space-after-image": chat_prompt(["<image> What shape is this?"]),
    "space-after-eos": "[INST] red [/INST] yes </s> [INST] blue [/INST]",
    "leading-space": " What shape is this?",
    "odd": "<s><s>  a\u2581b <unk>x</s>\n<image><image>\t z ",
    "empty": "",
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_mlx_model_dir) -> dict:
    """The tiny model with SentencePiece tokenizers (legacy True/False) and tokenizer.json ones."""
    root = tmp_path_factory.mktemp("tokenizers")
    dirs = {}
    for variant in ("spm-legacy", "spm", "json-legacy", "json"):
        directory = root / variant
        directory.mkdir()
        for name in ("config.json", "model.safetensors", "model.safetensors.index.json"):
            if (tiny_mlx_model_dir / name).exists():
                shutil.copy(tiny_mlx_model_dir / name, directory / name)
        dirs[variant] = directory
    for legacy, suffix in ((True, "-legacy"), (False, "")):
        write_tokenizer(dirs[f"spm{suffix}"], legacy=legacy)
        json_dir = dirs[f"json{suffix}"]
        hf_tokenizer(dirs[f"spm{suffix}"]).save_pretrained(json_dir)
        assert (json_dir / "tokenizer.json").exists() and not (json_dir / "tokenizer.model").exists()
        # transformers 5 leaves `legacy` out of the saved tokenizer_config.json, and LlamaTokenizer
        # then rebuilds the pre-tokenizer as legacy=False; keep the setting as a checkpoint would.
        config = json.loads((json_dir / "tokenizer_config.json").read_text())
        (json_dir / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": legacy}))
    return dirs


def hf_tokenizer(directory: Path):
    """transformers' tokenizer for `directory`, without its warnings about the CuMo config.json."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return AutoTokenizer.from_pretrained(directory)
    finally:
        hf_logging.set_verbosity(verbosity)


def slow_reference(directory: Path, variant: str):
    spm_dir = directory.parent / ("spm-legacy" if variant.endswith("legacy") else "spm")
    return SlowLlamaTokenizer(spm_dir / "tokenizer.model", legacy=variant.endswith("legacy"))


@pytest.mark.parametrize("variant", ["spm-legacy", "spm", "json-legacy", "json"])
def test_template_prompt_ids(model_dirs, variant):
    _, processor = cumo_mlx.load(model_dirs[variant])
    slow = slow_reference(model_dirs[variant], variant)
    fast = hf_tokenizer(model_dirs[variant])
    for name, prompt in TEMPLATE_PROMPTS.items():
        ids = processor.tokenize(prompt)
        assert ids == tokenizer_image_token(prompt, slow), name
        assert ids == tokenizer_image_token(prompt, lambda text: fast(text).input_ids), name
        assert ids.count(IMAGE) == prompt.count("<image>"), name
        assert all(0 <= i < 400 for i in ids if i != IMAGE)
        if name.startswith("plain"):
            assert ids[:2] == [1, IMAGE]  # the empty first chunk leaves its BOS
        else:
            assert ids[:2] == [1, 1] and ids[2] != 1  # BOS, then the template's literal <s>
    multi = processor.tokenize(TEMPLATE_PROMPTS["multi-turn"])
    assert multi.count(2) == 2 and multi.count(1) == 2  # a </s> after each answer, no BOS between turns


@pytest.mark.parametrize("variant", ["spm-legacy", "spm"])
def test_space_prompt_ids_follow_the_slow_tokenizer(model_dirs, variant):
    """With tokenizer.model (as the checkpoints ship it) the ids are the original's here too."""
    _, processor = cumo_mlx.load(model_dirs[variant])
    slow = slow_reference(model_dirs[variant], variant)
    for name, prompt in SPACE_PROMPTS.items():
        assert processor.tokenize(prompt) == tokenizer_image_token(prompt, slow), name
    assert processor.tokenize("<image> x")[:3] == [1, IMAGE, 358]  # "▁" of the dummy prefix, then "▁x"...


@pytest.mark.parametrize("variant", ["json-legacy", "json"])
def test_tokenizer_json_splice(model_dirs, variant):
    """tokenizer.json alone: its own (fast) tokenization, spliced as the original splices."""
    _, processor = cumo_mlx.load(model_dirs[variant])
    assert processor.encoder is None
    fast = hf_tokenizer(model_dirs[variant])
    for name, prompt in {**TEMPLATE_PROMPTS, **SPACE_PROMPTS}.items():
        assert processor.tokenize(prompt) == tokenizer_image_token(prompt, lambda text: fast(text).input_ids), name


def test_decode_skips_placeholders(model_dirs):
    _, processor = cumo_mlx.load(model_dirs["spm-legacy"])
    ids = processor.tokenize("<image>\nWhat shape is this?")
    assert IMAGE in ids and "What shape is this?" in processor.decode(ids)


# Ids that transformers 4.37.2's slow LlamaTokenizer (use_fast=False, as the original loads it) gave
# for these prompts through the original's splice, with the tokenizer tiny_models.write_tokenizer
# trains. Checked when the training gives that same vocabulary (SentencePiece's trainer may change).
VOCAB_SHA256 = "f6ef6dc5c000421a60968bcf7f0088a6f3524b3d02f81103025812e24edacb02"
GOLDEN_PROMPTS = [
    "<s>[INST] <image>\nWhat shape is this? [/INST] A red circle. </s>[INST] two [/INST]",
    "<image> What color is it?",
    "<s><s>  a\u2581b <unk>x</s>\n<image><image>\t z ",
]
GOLDEN_IDS = {
    "spm-legacy": [
        [1, 1, 302, 318, 390, 358, -200, 358, 13, 383, 271, 324, 359, 285, 316, 277, 377, 302, 386, 318, 390, 351, 322,
         288, 372, 358, 2, 302, 318, 390, 260, 350, 302, 386, 318, 390],
        [1, -200, 358, 287, 323, 364, 285, 264, 361, 377],
        [1, 1, 1, 358, 358, 259, 283, 358, 0, 358, 123, 2, 358, 13, -200, -200, 358, 12, 358, 125, 358],
    ],
    "spm": [
        [1, 1, 389, 318, 390, 358, -200, 358, 13, 383, 271, 324, 359, 285, 316, 277, 377, 302, 386, 318, 390, 351, 322,
         288, 372, 358, 2, 389, 318, 390, 260, 350, 302, 386, 318, 390],
        [1, -200, 358, 287, 323, 364, 285, 264, 361, 377],
        [1, 1, 1, 358, 259, 283, 358, 0, 123, 2, 13, -200, -200, 358, 12, 358, 125, 358],
    ],
}


@pytest.mark.parametrize("variant", ["spm-legacy", "spm"])
def test_ids_recorded_from_the_original_tokenizer(model_dirs, variant):
    sp = spm.SentencePieceProcessor(model_file=str(model_dirs[variant] / "tokenizer.model"))
    vocabulary = "\n".join(sp.id_to_piece(i) for i in range(sp.get_piece_size()))
    if hashlib.sha256(vocabulary.encode()).hexdigest() != VOCAB_SHA256:
        pytest.skip("this sentencepiece trains a different tiny vocabulary than the recorded ids used")
    _, processor = cumo_mlx.load(model_dirs[variant])
    slow = slow_reference(model_dirs[variant], variant)
    for prompt, ids in zip(GOLDEN_PROMPTS, GOLDEN_IDS[variant]):
        assert tokenizer_image_token(prompt, slow) == ids  # the re-implementation is the original's
        assert processor.tokenize(prompt) == ids


# ---------------------------------------------------------------- quiet loading


def test_load_writes_nothing_to_stderr(tmp_path):
    """No transformers warnings ("You are using a model of type llava_mixtral ...", rope_scaling)."""
    directory = write_mlx_model(tmp_path / "mixtral", tiny_config("mixtral"))
    code = "import cumo_mlx; model, processor = cumo_mlx.load(__import__('sys').argv[1]); print(processor.tokenize('<image>hi'))"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="default")
    result = subprocess.run([sys.executable, "-c", code, str(directory)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert json.loads(result.stdout)[:2] == [1, IMAGE]
