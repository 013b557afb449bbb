"""Every command x every bad input: one `error: <what> (<fix>)` line, the right exit code, no traceback,
and nothing written.

The table (ROWS) holds each command's bad inputs: usage errors (unknown option, missing or extra
argument, bad type or choice), model directories broken every way a directory can be, data files,
images, text that is not UTF-8, sampling and training options out of range, YAML configs, adapters,
checkpoints to convert, unreadable files (permission refused through a patched `open`: the tests run
as root, whom chmod does not stop), output paths that cannot be written, hub ids while offline. A row
applies a case to one command; `len(ROWS)` is the number of bad inputs tried (printed by
`test_table_size`). Accepted-but-odd inputs (1x1 and extreme aspect ratios, image modes, emoji,
top-k above the vocabulary) are checked to work in `test_odd_inputs_work`.

Already covered elsewhere, not repeated here: tests/test_generate.py::BAD_INPUTS (33 generate rows:
images, prompts, sampling, context length), test_chat.py::test_chat_cli_bad_input, test_convert.py
(damaged checkpoints, existing destination, hub offline, malicious pickles), test_shapes.py
(`data shapes` arguments), test_experts.py, test_upcycle.py (an MoE model), test_lora.py (adapters of
another model, a full model given as adapters), test_train.py (checkpoints without --resume, YAML
typo), test_faults.py (damaged checkpoint on resume, full disks).
"""

import builtins
import errno
import io
import json
import os
import shutil
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from cumo_mlx.cli.main import COMMANDS
from cumo_mlx.cli.main import main as cli_main
from PIL import Image
from tiny_data import instruct_samples, write_dataset, write_images
from tiny_models import tiny_config, write_mlx_model

TRAIN = ["--iters", "1", "--batch-size", "2", "--lora-rank", "2", "--no-progress"]
BASE = {
    "generate": ["generate", "--model", "{model}", "--prompt", "What is it?", "--max-tokens", "2"],
    "chat": ["chat", "--model", "{model}", "--max-tokens", "2"],
    "train": ["train", "--model", "{model}", "--data", "{data}", "--image-folder", "{images}", "--output", "{tmp}/out", *TRAIN],
    "upcycle": ["upcycle", "--model", "{dense}", "--mlx-path", "{tmp}/out"],
    "fuse": ["fuse", "--model", "{model}", "--adapter-path", "{adapters}", "--mlx-path", "{tmp}/out"],
    "experts": ["experts", "--model", "{model}", "--data", "{data}", "--image-folder", "{images}", "--no-progress"],
    "convert": ["convert", "--hf-path", "{src}", "--mlx-path", "{tmp}/out", "--no-progress"],
    "data shapes": ["data", "shapes", "--out", "{tmp}/out", "--count", "2", "--no-progress"],
    "serve": ["serve", "--model", "{model}", "--port", "0"],
    "eval": ["eval", "--task", "shapes", "--data-dir", "{tmp}/eval", "--model", "{model}", "--output", "{tmp}/out/a.jsonl"],
}  # fmt: skip
MODEL_FLAG = {"upcycle": "--model", "fuse": "--model", "generate": "--model", "chat": "--model", "train": "--model", "experts": "--model", "serve": "--model"}


@dataclass
class Row:
    command: str
    case: str
    fragment: str  # in the error line
    set: dict = field(default_factory=dict)  # flag -> value (None: leave the flag out)
    add: list = field(default_factory=list)
    code: int = 2
    stdin: object = "What is it?\n"
    unreadable: str = ""  # a path (template) that `open` refuses, as chmod would for another user

    def argv(self, paths: dict) -> list:
        args = list(BASE[self.command])
        for flag, value in self.set.items():
            if flag in args:
                i = args.index(flag)
                del args[i : i + 2]
            if value is not None:
                args += [flag, value]
        return [str(a).format(**paths) for a in args + self.add]


ROWS: list[Row] = []


def rows(commands, case, fragment, **kwargs):
    for command in commands.split(","):
        ROWS.append(Row(command.strip(), case, fragment, **kwargs))


ALL = "generate, chat, train, upcycle, fuse, experts, convert, data shapes, serve, eval"
MODELS = "generate, chat, train, upcycle, fuse, experts, serve"

# -- usage: click's errors in the one style ----------------------------------------------------
rows(ALL, "unknown option", "No such option '--frobnicate'", add=["--frobnicate"])
rows(ALL, "unexpected extra argument", "Got unexpected extra argument", add=["stray"])
for command, flag in {"generate": "--max-tokens", "chat": "--temp", "train": "--iters", "upcycle": "--top-k",
                      "fuse": "--mlx-path", "experts": "--batch-size", "convert": "--dtype", "data shapes": "--count"}.items():  # fmt: skip
    rows(command, f"{flag} without its value", "requires an argument", add=[flag])
for command, flag in {"train": "--model", "upcycle": "--mlx-path", "fuse": "--adapter-path", "experts": "--data",
                      "convert": "--hf-path", "data shapes": "--out"}.items():  # fmt: skip
    rows(command, f"missing {flag}", f"Missing option '{flag}'", set={flag: None})
for command, flag in {"generate": "--max-tokens", "chat": "--top-k", "train": "--iters", "upcycle": "--num-experts",
                      "experts": "--batch-size", "data shapes": "--count"}.items():  # fmt: skip
    rows(command, f"{flag} not a number", "is not a valid integer", set={flag: "many"})
rows("generate, chat", "--temp not a number", "is not a valid float", set={"--temp": "hot"})
rows("train", "--learning-rate not a number", "is not a valid float", set={"--learning-rate": "fast"})
for command, flag in {"train": "--stage", "convert": "--dtype", "experts": "--template"}.items():
    rows(command, f"{flag} not a choice", "is not one of", set={flag: "bogus"})
rows("convert", "--q-bits not a choice", "is not one of", set={"--q-bits": "5"})
rows("convert", "--q-group-size not a choice", "is not one of", set={"--q-group-size": "48"})
rows("convert", "--q-bits without -q", "--q-bits has no effect without --quantize", add=["--q-bits", "8"])
rows("convert", "--q-group-size without -q", "--q-group-size has no effect without --quantize", add=["--q-group-size", "32"])
rows("generate, chat", "--kv-bits: no group size divides the head size", "leave out kv_bits", set={"--kv-bits": "4"})
rows("generate, chat", "--kv-group-size without --kv-bits", "kv_group_size has no effect without kv_bits", set={"--kv-group-size": "32"})
rows("train", "--fine-tune-type not a choice", "is not one of", set={"--fine-tune-type": "dora"})
rows("serve", "--port without its value", "requires an argument", add=["--port"])
rows("serve", "--port out of range", "is not in the range", set={"--port": "70000"})
rows("serve", "--max-queue zero", "is not in the range", set={"--max-queue": "0"})
rows("serve", "--allow-local-files missing", "does not exist", set={"--allow-local-files": "{tmp}/nowhere"})
rows("serve", "--api-key empty", "the API key is empty", set={"--api-key": ""})
rows("serve", "--host of no interface here", "cannot listen on", set={"--host": "192.0.2.1"})
rows("eval", "--limit zero", "is not in the range", set={"--limit": "0"})
rows("eval", "--task not a choice", "is not one of", set={"--task": "bogus"})
rows("eval", "--answers with --model", "--answers scores an existing file", add=["--answers", "{tmp}/a.jsonl"])
rows("eval", "--data-dir missing", "does not exist")  # the rest: tests/eval/test_cli.py

# -- model directories broken every way ---------------------------------------------------------
MODEL_CASES = {
    "missing directory": ("{tmp}/nowhere", "model directory not found"),
    "a file, not a directory": ("{files}/notes.txt", "is a file, not a model directory"),
    "empty directory": ("{m}/empty", "no config.json"),
    "config.json is a directory": ("{m}/config-dir", "no config.json"),
    "config.json not JSON": ("{m}/config-not-json", "is not valid JSON"),
    "config.json empty": ("{m}/config-empty", "is not valid JSON"),
    "config.json not UTF-8": ("{m}/config-latin1", "is not valid JSON"),
    "config.json a list": ("{m}/config-list", "must hold a JSON object"),
    "config.json nested too deep": ("{m}/config-deep", "nested too deeply"),
    "config field of the wrong type": ("{m}/config-wrong-type", "config field 'hidden_size' must be int"),
    "config field missing": ("{m}/config-missing-field", "missing the field 'hidden_size'"),
    "config size zero": ("{m}/config-zero-heads", "'num_attention_heads' must be at least 1"),
    "config size negative": ("{m}/config-negative-layers", "'num_hidden_layers' must be at least 1"),
    "text_config not an object": ("{m}/config-text-not-object", "text_config must be a JSON object"),
    "unknown model_type": ("{m}/config-unknown-type", "unknown model_type 'llava_llama'"),
    "vision config of the wrong type": ("{m}/vision-wrong-type", "config field 'patch_size' must be int"),
    "vision patch size zero": ("{m}/vision-zero-patch", "'patch_size' must be at least 1"),
    "vision mean of 2 values": ("{m}/vision-short-mean", "must be 3 values"),
    "broken quantization entry": ("{m}/bad-quantization", "lacks a positive group_size or bits"),
    "original layout, not converted": ("{m}/not-converted", "not in MLX layout"),
    "no weights": ("{m}/no-weights", "no model*.safetensors"),
    "empty weights file": ("{m}/weights-empty", "cannot load the weights"),
    "truncated weights file": ("{m}/weights-truncated", "cannot load the weights"),
    "garbage weights file": ("{m}/weights-garbage", "cannot load the weights"),
    "weights file is a directory": ("{m}/weights-dir", "cannot load the weights"),
    "weights of another shape": ("{m}/weights-other-shape", "cannot load the weights"),
    "model_file asks to run code": ("{m}/model-file", "custom module"),
    "no tokenizer": ("{m}/no-tokenizer", "no tokenizer files"),
    "tokenizer config not JSON": ("{m}/tokenizer-config-not-json", "cannot load the tokenizer"),
    "tokenizer.model is a directory": ("{m}/tokenizer-dir", "cannot load the tokenizer"),
    "hub id offline, not cached": ("nobody-here/no-such-cumo", "not in the local Hugging Face cache"),
    "neither a path nor a hub id": ("a/b/c", "model directory not found"),
    "home of no such user": ("~nobody-here-at-all/model", "model directory not found"),
    "name too long for a path": ("m" * 5000, "model directory not found"),
}
for case, (value, fragment) in MODEL_CASES.items():
    for command in MODELS.split(", "):
        if command in ("upcycle", "fuse") and "tokenizer" in case:
            continue  # they copy the tokenizer files, never load them
        rows(command, f"model: {case}", fragment, set={MODEL_FLAG[command]: value})
rows("generate, chat, experts", "model: config.json unreadable", "Permission denied", unreadable="{model}/config.json")
rows("generate, chat", "model: tokenizer larger than the embedding", "more than the model's vocabulary", set={"--model": "{m}/tokenizer-larger"})
rows("generate, chat", "model: tokenizer.model corrupt", "is not a SentencePiece tokenizer model", set={"--model": "{m}/tokenizer-corrupt"})

# -- data files (train, experts) ------------------------------------------------------------------
DATA_CASES = {
    "missing file": ("{tmp}/nowhere.json", "data file not found"),
    "a directory": ("{files}", "is a directory, not a data file"),
    "a FIFO": ("{files}/fifo", "is a pipe, device or socket"),
    "image symlinked out of the folder": ("{files}/linked.json", "no usable samples"),
    "empty file": ("{files}/empty.json", "holds no samples"),
    "not JSON": ("{files}/not-json.json", "is not valid JSON"),
    "not UTF-8": ("{files}/latin1.json", "cannot read"),
    "nested too deep": ("{files}/deep.json", "nested too deeply"),
    "a JSON number": ("{files}/number.json", "must hold a JSON list"),
    "an empty list": ("{files}/empty-list.json", "holds no samples"),
    "no usable sample": ("{files}/no-conversations.json", "no usable samples"),
    "every image outside the folder": ("{files}/escapes.json", "no usable samples"),
    "text with lone surrogates": ("{files}/surrogates.json", "no usable samples"),
}
for case, (value, fragment) in DATA_CASES.items():
    rows("train, experts", f"data: {case}", fragment, set={"--data": value})
rows("train, experts", "data: unreadable", "Permission denied", unreadable="{data}")
rows("train", "--image-folder missing", "image folder not found", set={"--image-folder": "{tmp}/nowhere"})
rows("train", "--image-folder a file", "image folder not found", set={"--image-folder": "{data}"})
rows("experts", "--image-folder missing", "is not a folder", set={"--image-folder": "{tmp}/nowhere"})
rows("experts", "--image-folder a file", "is not a folder", set={"--image-folder": "{data}"})

# -- images (generate, chat) ----------------------------------------------------------------------
IMAGE_CASES = {
    "missing file": ("{tmp}/nowhere.png", "image file not found"),
    "a directory": ("{files}", "is a directory, not an image"),
    "empty file": ("{files}/empty.png", "cannot read"),
    "text named .png": ("{files}/notes.png", "cannot read"),
    "truncated JPEG": ("{files}/truncated.jpg", "cannot read"),
    "SVG": ("{files}/drawing.svg", "cannot read"),
    "decompression bomb": ("{files}/bomb.png", "too large to decode safely"),
    "/dev/zero": ("/dev/zero", "cannot read"),
    "file:// URL": ("file:///etc/passwd", "unsupported image URL scheme"),
    "ftp:// URL": ("ftp://127.0.0.1/x.png", "unsupported image URL scheme"),
    "unreachable http URL": ("http://127.0.0.1:9/x.png", "cannot download image"),
    "home of no such user": ("~nobody-here-at-all/x.png", "image file not found"),
    "name too long for a path": ("x" * 5000 + ".png", "image file not found"),
}
for case, (value, fragment) in IMAGE_CASES.items():
    rows("chat", f"image: {case}", fragment, add=["--image", value])
    if case not in ("missing file", "text named .png", "truncated JPEG", "decompression bomb", "unreachable http URL"):
        rows("generate", f"image: {case}", fragment, add=["--image", value])  # the others: test_generate.py
rows("generate, chat", "image: unreadable", "permission denied", add=["--image", "{good_image}"], unreadable="{good_image}")

# -- text -------------------------------------------------------------------------------------------
rows("generate", "prompt with undecodable bytes", "not valid UTF-8", set={"--prompt": "What \udcff is it?"})
rows("generate", "system text with undecodable bytes", "not valid UTF-8", add=["--system", "Be \udcfe brief."])
rows("generate", "stdin prompt not UTF-8", "not valid UTF-8", set={"--prompt": "-"}, stdin=b"What \xff\xfe is it?\n")
rows("generate", "stdin prompt empty", "the prompt is empty", set={"--prompt": "-"}, stdin=b"")
rows("chat", "a line not UTF-8 (reported, the chat goes on)", "not valid UTF-8", code=0, stdin=b"What \xff is it?\nhi\n")
rows("chat", "system text with undecodable bytes", "not valid UTF-8", add=["--system", "\udcff"])
rows("chat", "a line past the context (reported, the chat goes on)", "over the model's context", code=0, stdin="red " * 5000 + "\nhi\n")

# -- sampling (test_generate.py has the rest for generate) ----------------------------------------
SAMPLING = {
    "--max-tokens 0": ({"--max-tokens": "0"}, "max_tokens must be at least 1"),
    "--max-tokens negative": ({"--max-tokens": "-3"}, "max_tokens must be at least 1"),
    "--temp nan": ({"--temp": "nan"}, "temp must be >= 0 and finite"),
    "--temp inf": ({"--temp": "inf"}, "temp must be >= 0 and finite"),
    "--top-p nan": ({"--top-p": "nan"}, "top_p must be in (0, 1]"),
    "--top-p 0": ({"--top-p": "0"}, "top_p must be in (0, 1]"),
    "--min-p nan": ({"--min-p": "nan"}, "min_p must be in [0, 1]"),
    "--min-p 2": ({"--min-p": "2"}, "min_p must be in [0, 1]"),
    "--top-k negative": ({"--top-k": "-1"}, "top_k must be >= 0"),
    "--repetition-penalty nan": ({"--repetition-penalty": "nan"}, "repetition_penalty must be > 0 and finite"),
    "--repetition-penalty 0": ({"--repetition-penalty": "0"}, "repetition_penalty must be > 0"),
    "--repetition-context-size 0": ({"--repetition-context-size": "0"}, "repetition_context_size must be at least 1"),
    "--kv-bits 7": ({"--kv-bits": "7"}, "kv_bits must be one of"),
    "--kv-group-size 16": ({"--kv-bits": "4", "--kv-group-size": "16"}, "kv_group_size must be one of"),
    "--max-kv-size 0": ({"--max-kv-size": "0"}, "max_kv_size must be at least 1"),
    "--prefill-step-size 0": ({"--prefill-step-size": "0"}, "prefill_step_size must be at least 1"),
    "--quantized-kv-start negative": ({"--quantized-kv-start": "-1"}, "quantized_kv_start must be >= 0"),
    "--seed negative": ({"--seed": "-1"}, "is not in the range"),
    "--seed over 64 bits": ({"--seed": str(2**64)}, "is not in the range"),
}
for case, (values, fragment) in SAMPLING.items():
    rows("chat", case, fragment, set=values)
    if "nan" in case or "inf" in case or "seed" in case or "context-size" in case or "kv-start" in case:
        rows("generate", case, fragment, set=values)

# -- training options and config files ------------------------------------------------------------
TRAIN_OPTIONS = {
    "--iters 0": ({"--iters": "0"}, "--iters must be at least 1"),
    "--iters and --epochs": ({"--epochs": "1"}, "--iters and --epochs both given"),
    "--epochs 0": ({"--iters": None, "--epochs": "0"}, "--epochs must be positive"),
    "--batch-size 0": ({"--batch-size": "0"}, "--batch-size must be at least 1"),
    "--grad-accumulation-steps 0": ({"--grad-accumulation-steps": "0"}, "--grad-accumulation-steps must be at least 1"),
    "--learning-rate negative": ({"--learning-rate": "-1e-3"}, "--learning-rate must be a non-negative number"),
    "--learning-rate nan": ({"--learning-rate": "nan"}, "--learning-rate must be a non-negative number"),
    "--learning-rate inf": ({"--learning-rate": "inf"}, "--learning-rate must be a non-negative number"),
    "--vision-learning-rate negative": ({"--vision-learning-rate": "-1e-4"}, "--vision-learning-rate must be a non-negative number"),
    "--warmup-ratio 1": ({"--warmup-ratio": "1"}, "--warmup-ratio must be in [0, 1)"),
    "--weight-decay negative": ({"--weight-decay": "-0.1"}, "--weight-decay must be non-negative"),
    "--weight-decay inf": ({"--weight-decay": "inf"}, "--weight-decay must be non-negative and finite"),
    "--lora-alpha nan": ({"--lora-alpha": "nan"}, "--lora-alpha must be a finite number"),
    "--balance-loss-coef negative": ({"--balance-loss-coef": "-1"}, "--balance-loss-coef must be non-negative"),
    "--router-z-loss-coef nan": ({"--router-z-loss-coef": "nan"}, "--router-z-loss-coef must be non-negative"),
    "--max-grad-norm negative": ({"--max-grad-norm": "-1"}, "--max-grad-norm must be non-negative"),
    "--lora-rank 0": ({"--lora-rank": "0"}, "--lora-rank must be at least 1"),
    "--lora-dropout 1": ({"--lora-dropout": "1"}, "--lora-dropout must be in [0, 1)"),
    "--lora-layers 0": ({"--lora-layers": "0"}, "--lora-layers must be positive"),
    "--max-seq-length 1": ({"--max-seq-length": "1"}, "--max-seq-length must be at least 2"),
    "--save-every 0": ({"--save-every": "0"}, "--save-every must be at least 1"),
    "--keep-checkpoints 0": ({"--keep-checkpoints": "0"}, "--keep-checkpoints must be at least 1"),
    "--output is a file": ({"--output": "{files}/notes.txt"}, "is a file or inside one"),
    "--output inside a file": ({"--output": "{files}/notes.txt/out"}, "is a file or inside one"),
    "-c missing": ({}, "cannot read the config file"),
    "-c a directory": ({}, "is a directory"),
    "-c not YAML": ({}, "cannot read the config file"),
    "-c not UTF-8": ({}, "cannot read the config file"),
    "-c a list": ({}, "must hold a mapping"),
    "-c unknown key": ({}, "unknown setting(s) lerning_rate"),
    "-c value of the wrong type": ({}, "is not a valid integer"),
    "-c python object tag": ({}, "cannot read the config file"),
    "-c lora scale not a number": ({}, "lora_parameters.scale and rank must be numbers"),
    "-c lora scale without rank": ({}, "lora_parameters.scale needs lora_parameters.rank"),
    "-c unreadable": ({}, "Permission denied"),
    "--seed negative": ({"--seed": "-1"}, "--seed must be in [0, 4294967295]"),
    "--seed of 20 digits": ({"--seed": "12345678901234567890"}, "--seed must be in [0, 4294967295]"),
    "--epochs inf": ({"--iters": None, "--epochs": "inf"}, "--epochs must be positive and finite"),
    "--epochs nan": ({"--iters": None, "--epochs": "nan"}, "--epochs must be positive and finite"),
    "--max-seq-length 0": ({"--max-seq-length": "0"}, "--max-seq-length must be at least 2"),
    "--lora-layers -2": ({"--lora-layers": "-2"}, "--lora-layers must be positive, or -1 for all"),
    "--max-grad-norm inf": ({"--max-grad-norm": "inf"}, "--max-grad-norm must be non-negative and finite"),
    "-c a fraction for a whole number": ({}, "--batch-size must be a whole number, not 2.5"),
    "-c a list for a number": ({}, "--seed must be a whole number, not [1]"),
    "-c a mapping for a number": ({}, "--epochs must be a number, not {'a': 1}"),
    "-c true for a number": ({}, "--iters must be a whole number, not True"),
    "-c lora_parameters a list": ({}, "lora_parameters must be a mapping"),
    "every answer past --max-seq-length": ({"--max-seq-length": "2"}, "nothing was trained"),
    "every image unreadable": ({"--data": "{files}/unreadable-images.json", "--image-folder": "{files}"}, "nothing was trained"),
}
YAML = {
    "-c missing": "{tmp}/nowhere.yaml", "-c a directory": "{files}", "-c not YAML": "{files}/not-yaml.yaml",
    "-c not UTF-8": "{files}/latin1.yaml", "-c a list": "{files}/list.yaml", "-c unknown key": "{files}/typo.yaml",
    "-c value of the wrong type": "{files}/wrong-type.yaml", "-c python object tag": "{files}/python-tag.yaml",
    "-c lora scale not a number": "{files}/lora-scale.yaml", "-c lora scale without rank": "{files}/lora-no-rank.yaml",
    "-c unreadable": "{files}/typo.yaml", "-c a fraction for a whole number": "{files}/fraction.yaml",
    "-c a list for a number": "{files}/list-number.yaml", "-c a mapping for a number": "{files}/mapping-number.yaml",
    "-c true for a number": "{files}/bool-number.yaml", "-c lora_parameters a list": "{files}/lora-list.yaml",
}  # fmt: skip
for case, (values, fragment) in TRAIN_OPTIONS.items():
    rows("train", case, fragment, set=values, add=["-c", YAML[case]] if case in YAML else [],
         unreadable="{files}/typo.yaml" if case == "-c unreadable" else "")  # fmt: skip

# -- upcycle, fuse: options, adapters, outputs ----------------------------------------------------
rows("upcycle", "--num-experts 0", "is not in the range", set={"--num-experts": "0"})
rows("upcycle", "--top-k 0", "is not in the range", set={"--top-k": "0"})
rows("upcycle", "--top-k above --num-experts", "must be between 1 and --num-experts", set={"--num-experts": "2", "--top-k": "3"})
rows("upcycle", "--seed negative", "is not in the range", set={"--seed": "-1"})
rows("upcycle, fuse", "--mlx-path is a file", "is a file", set={"--mlx-path": "{files}/notes.txt"})
rows("upcycle, fuse", "--mlx-path inside a file", "Not a directory", set={"--mlx-path": "{files}/notes.txt/out"})
rows("upcycle", "--mlx-path is the model", "an input of this command", set={"--mlx-path": "{dense}"})
rows("fuse", "--mlx-path is the model", "an input of this command", set={"--mlx-path": "{model}"})
rows("fuse", "--mlx-path is the adapters", "an input of this command", set={"--mlx-path": "{adapters}"})
ADAPTER_CASES = {
    "missing directory": ("{tmp}/nowhere", "no adapter_config.json and adapters.safetensors"),
    "a file": ("{files}/notes.txt", "is a file"),
    "empty directory": ("{a}/empty", "no adapter_config.json and adapters.safetensors"),
    "config not JSON": ("{a}/not-json", "cannot read"),
    "config not UTF-8": ("{a}/latin1", "cannot read"),
    "config nested too deep": ("{a}/deep", "cannot read"),
    "config a list": ("{a}/list", "does not describe LoRA adapters"),
    "config without lora_parameters": ("{a}/no-lora", "does not describe LoRA adapters"),
    "lora rank not a number": ("{a}/rank-string", "does not describe LoRA adapters"),
    "num_layers not a number": ("{a}/layers-string", "does not describe LoRA adapters"),
    "weights empty": ("{a}/weights-empty", "cannot read"),
    "weights garbage": ("{a}/weights-garbage", "cannot read"),
}
for case, (value, fragment) in ADAPTER_CASES.items():
    rows("fuse", f"adapters: {case}", fragment, set={"--adapter-path": value})
rows("fuse", "adapters: config unreadable", "Permission denied", unreadable="{adapters}/adapter_config.json")

# -- convert: checkpoints broken every way (test_convert.py has weights that do not match) ---------
CONVERT_CASES = {
    "missing directory": ("{tmp}/nowhere", "checkpoint directory not found"),
    "home of no such user": ("~nobody-here-at-all/ckpt", "checkpoint directory not found"),
    "a file": ("{files}/notes.txt", "is a file, not a checkpoint directory"),
    "config.json not JSON": ("{s}/config-not-json", "is not valid JSON"),
    "config.json not UTF-8": ("{s}/config-latin1", "is not valid JSON"),
    "config.json a list": ("{s}/config-list", "must hold a JSON object"),
    "config.json nested too deep": ("{s}/config-deep", "nested too deeply"),
    "config field of the wrong type": ("{s}/config-wrong-type", "must be int"),
    "config field missing": ("{s}/config-missing-field", "missing the field 'hidden_size'"),
    "unknown model_type": ("{s}/config-unknown-type", "unknown model_type"),
    "already quantized": ("{s}/quantized", "already quantized"),
    "vision tower neither known nor cached": ("{s}/unknown-tower", "not in the local hub cache"),
    "empty safetensors": ("{s}/weights-empty", "truncated (no safetensors header)"),
    "garbage safetensors": ("{s}/weights-garbage", "truncated or not a safetensors file"),
    "safetensors header not JSON": ("{s}/header-not-json", "cannot read the safetensors header"),
    "safetensors header with infinite sizes": ("{s}/header-infinite", "invalid header entry"),
    "index not JSON": ("{s}/index-not-json", "cannot read the index"),
    "index names a file outside": ("{s}/index-outside", "names weight files outside the checkpoint directory"),
    "no tokenizer": ("{s}/no-tokenizer", "no tokenizer in"),
}
for case, (value, fragment) in CONVERT_CASES.items():
    rows("convert", f"checkpoint: {case}", fragment, set={"--hf-path": value})
rows("convert", "checkpoint: config.json unreadable", "Permission denied", unreadable="{src}/config.json")
rows("convert", "--mlx-path inside a file", "is not a directory", set={"--mlx-path": "{files}/notes.txt/out"})

# -- data shapes, experts: outputs (test_shapes.py / test_experts.py have the rest) ---------------
rows("data shapes", "--out inside a file", "Not a directory", set={"--out": "{files}/notes.txt/out"})
rows("data shapes", "--count negative", "is not in the range", set={"--count": "-1"})
rows("data shapes", "--multi-turn nan", "--multi-turn must be in [0, 1]", add=["--multi-turn", "nan"])
rows("data shapes", "--out unwritable", "Permission denied", unreadable="{tmp}/out/images/000000.png")
rows("experts", "--json is a directory", "is a directory", add=["--json", "{files}"])
rows("experts", "--out is a directory", "is a directory", add=["--out", "{files}"])
rows("experts", "--max-samples 0", "is not in the range", add=["--max-samples", "0"])
rows("experts", "--json unwritable", "Permission denied", add=["--json", "{tmp}/routes.json"], unreadable="{tmp}/routes.json")
rows("experts", "model without MoE layers", "no MoE layers", set={"--model": "{dense}"})

# -- special files, overwrites (issue 32; the data rows above hold FIFOs and symlinks out) ----------
rows("generate, chat", "image: a FIFO", "is a pipe, device or socket", add=["--image", "{files}/fifo"])
rows("generate, chat", "image: an empty path", "the image path is empty", add=["--image", ""])
rows("train", "-c a FIFO", "is a pipe, device or socket", add=["-c", "{files}/fifo"])
rows("train", "-c an empty path", "the config file path is empty", add=["-c", ""])
rows("generate, chat, experts", "model: weights a FIFO", "is a pipe, device or socket", set={"--model": "{m}/weights-fifo"})
rows("generate, chat, experts", "model: tokenizer a FIFO", "is a pipe, device or socket", set={"--model": "{m}/tokenizer-fifo"})
rows("convert", "checkpoint: tensors that overlap", "overlap", set={"--hf-path": "{s}/overlap"})
rows("upcycle, fuse", "--mlx-path exists", "already exists", set={"--mlx-path": "{files}/existing"})
rows("data shapes", "--out holds files", "already exists", set={"--out": "{files}/existing"})
rows("experts", "--json exists", "already exists", add=["--json", "{files}/notes.txt"])
rows("experts", "--json is the --data file", "an input of this command", add=["--json", "{data}", "--force"])
rows("experts", "--out is the --data file", "an input of this command", add=["--out", "{data}", "--force"])
rows("convert", "--force onto a mount point", "cannot be replaced", set={"--mlx-path": "/"}, add=["--force"])


# ---------------------------------------------------------------------------------------------
# The files the rows use
# ---------------------------------------------------------------------------------------------


def variant(base: Path, path: Path, config=None, edit=None) -> None:
    """A copy of the model directory `base` with its config.json changed and/or files edited."""
    shutil.copytree(base, path)
    if config is not None:
        value = config(json.loads((path / "config.json").read_text()))
        (path / "config.json").write_bytes(value if isinstance(value, bytes) else json.dumps(value).encode())
    if edit is not None:
        edit(path)


def changed(**fields):
    return lambda c: {**c, **fields}


def without(key):
    return lambda c: {k: v for k, v in c.items() if k != key}


def vision(**fields):
    return lambda c: {**c, "vision_config": {**c["vision_config"], **fields}}


def weights(data):
    return lambda d: (d / "model.safetensors").write_bytes(data(d / "model.safetensors"))


DEEP = b"[" * 100_000 + b"]" * 100_000

MODEL_VARIANTS = {
    "config-dir": dict(edit=lambda d: ((d / "config.json").unlink(), (d / "config.json").mkdir())),
    "config-not-json": dict(config=lambda c: b"{oops"),
    "config-empty": dict(config=lambda c: b""),
    "config-latin1": dict(config=lambda c: b'{"model_type": "caf\xe9"}'),
    "config-list": dict(config=lambda c: [c]),
    "config-deep": dict(config=lambda c: DEEP),
    "config-wrong-type": dict(config=changed(hidden_size="64")),
    "config-missing-field": dict(config=without("hidden_size")),
    "config-zero-heads": dict(config=changed(num_attention_heads=0)),
    "config-negative-layers": dict(config=changed(num_hidden_layers=-1)),
    "config-text-not-object": dict(config=changed(text_config="mistral")),
    "config-unknown-type": dict(config=changed(model_type="llava_llama")),
    "vision-wrong-type": dict(config=vision(patch_size="4")),
    "vision-zero-patch": dict(config=vision(patch_size=0)),
    "vision-short-mean": dict(config=vision(image_mean=[0.5, 0.5])),
    "bad-quantization": dict(config=changed(quantization={"bits": "four"})),
    "not-converted": dict(config=without("vision_config")),
    "no-weights": dict(edit=lambda d: (d / "model.safetensors").unlink()),
    "weights-empty": dict(edit=weights(lambda p: b"")),
    "weights-truncated": dict(edit=weights(lambda p: p.read_bytes()[:5000])),
    "weights-garbage": dict(edit=weights(lambda p: np.random.default_rng(0).bytes(5000))),
    "weights-other-shape": dict(config=changed(vocab_size=512)),
    "weights-dir": dict(edit=lambda d: ((d / "model.safetensors").unlink(), (d / "model.safetensors").mkdir())),
    "tokenizer-dir": dict(edit=lambda d: ((d / "tokenizer.model").unlink(), (d / "tokenizer.model").mkdir())),
    "model-file": dict(config=changed(model_file="evil.py"), edit=lambda d: (d / "evil.py").write_text("raise SystemExit(3)\n")),
    "no-tokenizer": dict(edit=lambda d: [(d / n).unlink() for n in ("tokenizer.model", "tokenizer_config.json")]),
    "tokenizer-config-not-json": dict(edit=lambda d: (d / "tokenizer_config.json").write_text("{oops")),
    "weights-fifo": dict(edit=lambda d: ((d / "model.safetensors").unlink(), os.mkfifo(d / "model.safetensors"))),
    "tokenizer-fifo": dict(edit=lambda d: ((d / "tokenizer_config.json").unlink(), os.mkfifo(d / "tokenizer_config.json"))),
    "tokenizer-corrupt": dict(edit=lambda d: (d / "tokenizer.model").write_bytes(b"not a sentencepiece model" * 9)),
    "tokenizer-larger": dict(edit=lambda d: (d / "tokenizer_config.json").write_text(json.dumps({  # an id past the embedding
        **json.loads((d / "tokenizer_config.json").read_text()),
        "added_tokens_decoder": {"700": {"content": "<big>", "special": True}}}))),  # fmt: skip
}


def header(entries: dict) -> bytes:
    blob = json.dumps(entries).encode() if isinstance(entries, dict) else entries
    return len(blob).to_bytes(8, "little") + blob


def overlapping(path: Path) -> bytes:
    """The safetensors file at `path` with its second tensor's offsets moved onto the first's bytes."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    entries = json.loads(data[8 : 8 + n])
    first, second = [name for name in entries if name != "__metadata__"][:2]
    begin = entries[first]["data_offsets"][0]
    size = entries[second]["data_offsets"][1] - entries[second]["data_offsets"][0]
    entries[second]["data_offsets"] = [begin, begin + size]
    blob = json.dumps(entries, separators=(",", ":")).encode()
    assert len(blob) <= n  # the same header length: the offsets still count from the same byte
    return data[:8] + blob.ljust(n) + data[8 + n :]


SOURCE_VARIANTS = {  # checkpoint directories to convert (MLX-named weights: the failures come first)
    "config-not-json": dict(config=lambda c: b"{oops"),
    "config-latin1": dict(config=lambda c: b'{"model_type": "caf\xe9"}'),
    "config-list": dict(config=lambda c: [c]),
    "config-deep": dict(config=lambda c: DEEP),
    "config-wrong-type": dict(config=changed(hidden_size="64")),
    "config-missing-field": dict(config=without("hidden_size")),
    "config-unknown-type": dict(config=changed(model_type="llava_llama")),
    "quantized": dict(config=changed(quantization={"bits": 4, "group_size": 64})),
    "unknown-tower": dict(config=lambda c: {**without("vision_config")(c), "mm_vision_tower": "nobody-here/no-such-clip"}),
    "weights-empty": dict(edit=weights(lambda p: b"")),
    "weights-garbage": dict(edit=weights(lambda p: b"\xff" * 5000)),
    "header-not-json": dict(edit=weights(lambda p: header(b"{oops"))),
    "header-infinite": dict(edit=weights(lambda p: header(b'{"w": {"dtype": "F32", "shape": [1e999], "data_offsets": [0, 4]}}') + b"\0" * 4)),
    "index-not-json": dict(edit=lambda d: (d / "model.safetensors.index.json").write_text("{oops")),
    "index-outside": dict(edit=lambda d: (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../model.safetensors"}}))),
    "no-tokenizer": dict(edit=lambda d: [(d / n).unlink() for n in ("tokenizer.model", "tokenizer_config.json")]),
    "overlap": dict(edit=weights(overlapping)),
}

ADAPTER_CONFIGS = {
    "not-json": b"{oops",
    "latin1": b'{"num_layers": "caf\xe9"}',
    "deep": DEEP,
    "list": b"[1, 2]",
    "no-lora": b'{"fine_tune_type": "lora", "num_layers": -1}',
    "rank-string": b'{"num_layers": -1, "lora_parameters": {"rank": "8", "scale": 1.0, "dropout": 0.0}}',
    "layers-string": b'{"num_layers": "all", "lora_parameters": {"rank": 8, "scale": 1.0, "dropout": 0.0}}',
}

YAML_FILES = {
    "not-yaml.yaml": b"{oops: [",
    "latin1.yaml": b"iters: caf\xe9\n",
    "list.yaml": b"- iters\n- 2\n",
    "typo.yaml": b"lerning_rate: 1\n",
    "wrong-type.yaml": b"seed: many\n",
    "python-tag.yaml": b"!!python/object/apply:os.system ['touch PWNED']\n",
    "lora-scale.yaml": b"lora_parameters: {rank: 2, scale: big}\n",
    "lora-no-rank.yaml": b"lora_parameters: {scale: 2.0}\n",
    "fraction.yaml": b"batch_size: 2.5\n",
    "list-number.yaml": b"seed: [1]\n",
    "mapping-number.yaml": b"epochs: {a: 1}\n",
    "bool-number.yaml": b"iters: true\n",
    "lora-list.yaml": b"lora_parameters: [1]\n",
}


def bomb_png(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))  # fmt: skip


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tiny_mlx_model_dir):
    root = tmp_path_factory.mktemp("cli-errors")
    model = tiny_mlx_model_dir
    for name, how in MODEL_VARIANTS.items():
        variant(model, root / "m" / name, **how)
    (root / "m" / "empty").mkdir()
    for name, how in SOURCE_VARIANTS.items():
        variant(model, root / "s" / name, **how)

    files = root / "files"
    files.mkdir()
    (files / "notes.txt").write_text("not a model, not an image\n")
    (files / "notes.png").write_text("not an image\n")
    (files / "empty.png").write_bytes(b"")
    (files / "drawing.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    (files / "bomb.png").write_bytes(bomb_png(12000, 12000))
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(buffer, "JPEG")
    (files / "truncated.jpg").write_bytes(buffer.getvalue()[:200])
    conversation = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]
    for name, content in {
        "empty.json": b"",
        "not-json.json": b"[{oops",
        "latin1.json": b'[{"id": "caf\xe9"}]',
        "deep.json": DEEP,
        "number.json": b"42",
        "empty-list.json": b"[]",
        "no-conversations.json": b'[{"id": 1, "image": "red.png"}]',
        "escapes.json": json.dumps([{"image": n, "conversations": conversation} for n in ("../red.png", "/etc/passwd")]).encode(),
        "surrogates.json": b'[{"conversations": [{"from": "human", "value": "\\ud800 hi"}, {"from": "gpt", "value": "x"}]}]',
        "unreadable-images.json": json.dumps([{"image": n, "conversations": conversation} for n in ("notes.png", "empty.png", "truncated.jpg")]).encode(),
    }.items():
        (files / name).write_bytes(content)
    for name, content in YAML_FILES.items():
        (files / name).write_bytes(content)
    os.mkfifo(files / "fifo")  # read, it would block until a writer came: every reader must refuse it
    (files / "existing").mkdir()
    (files / "existing" / "keep.txt").write_text("an earlier output\n")
    Image.new("RGB", (8, 8)).save(files / "outside.png")
    (files / "linked.json").write_text(json.dumps([{"image": "escape.png", "conversations": conversation}]))

    images = root / "images"
    names = write_images(images)
    (images / "escape.png").symlink_to(files / "outside.png")  # in the image folder by name, outside in fact
    data = write_dataset(root, instruct_samples(names))
    dense = write_mlx_model(root / "dense", tiny_config(clip_smoe=False, connector="mlp2x_gelu"))
    adapters = root / "adapters"
    assert cli_main(Row("train", "", "", set={"--output": adapters}).argv({"model": model, "data": data, "images": images})) == 0
    for name, content in ADAPTER_CONFIGS.items():
        shutil.copytree(adapters, root / "a" / name)
        (root / "a" / name / "adapter_config.json").write_bytes(content)
    (root / "a" / "empty").mkdir()
    for name, content in {"weights-empty": b"", "weights-garbage": b"\x01" * 100}.items():
        shutil.copytree(adapters, root / "a" / name)
        (root / "a" / name / "adapters.safetensors").write_bytes(content)
    return {"model": model, "dense": dense, "adapters": adapters, "data": data, "images": images, "src": model,
            "files": files, "m": root / "m", "s": root / "s", "a": root / "a", "good_image": images / names["red"]}  # fmt: skip


def run(args: list, stdin) -> tuple[int, str, str]:
    with CliRunner().isolation(input=stdin) as (stdout, stderr, _):
        code = cli_main(args)
        sys.stdout.flush()
        sys.stderr.flush()
    return code, stdout.getvalue().decode(errors="replace"), stderr.getvalue().decode(errors="replace")


def refuse(monkeypatch, target: str) -> None:
    """`open(target)` fails as it does for a file the user may not read or write."""
    real_open = builtins.open

    def guarded(file, *args, **kwargs):
        if str(file) == target:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr(io, "open", guarded)


@pytest.fixture
def deadline():
    """A read that blocks (of a FIFO) fails its row instead of hanging the suite."""

    def expired(*_):
        raise TimeoutError("the command blocked for 300 s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(300)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache and conversion cache: hub ids are not there, and we are offline."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CUMO_MLX_CACHE", str(tmp_path / "cumo-cache"))


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.command}: {r.case}" for r in ROWS])
def test_bad_input(row, paths, tmp_path, monkeypatch, offline_hub, deadline):
    names = {**paths, "tmp": tmp_path}
    if row.unreadable:
        refuse(monkeypatch, row.unreadable.format(**names))
    code, out, err = run(row.argv(names), row.stdin)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == row.code, err
    assert len(errors) == 1 and row.fragment in errors[0], err
    assert errors[0].endswith(")"), errors[0]  # `(what to do)` closes every message
    assert "Traceback" not in err + out
    if row.code and "unwritable" not in row.case:
        assert not (tmp_path / "out").exists()  # nothing written


def test_table_size(capsys):
    commands = sorted({r.command for r in ROWS})
    with capsys.disabled():
        print(f"\n{len(ROWS)} bad inputs tried by tests/test_cli_errors.py across {len(commands)} commands")
    assert set(commands) == set(BASE) and {c.split()[0] for c in BASE} == set(COMMANDS)


def test_debug_shows_the_traceback(paths, tmp_path):
    code, _, err = run(["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "hi", "--debug"], None)
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: model directory not found")


def test_internal_failure_is_exit_1_with_a_hint(paths, monkeypatch):
    monkeypatch.setattr(sys.modules["cumo_mlx.generate"], "check_question", lambda *a: 1 / 0)
    code, _, err = run(["generate", "--model", str(paths["model"]), "--prompt", "hi"], None)
    assert code == 1 and err.strip() == "error: internal error: ZeroDivisionError: division by zero (rerun with --debug and report the traceback)"


def test_root_command_errors():
    for args, fragment in ((["frobnicate"], "No such command 'frobnicate'"), (["--frobnicate"], "No such option"),
                           (["data"], "name a dataset"), (["data", "nope"], "No such command 'nope'")):  # fmt: skip
        code, out, err = run(args, None)
        assert code == 2 and err.strip().startswith("error: ") and fragment in err and len(err.strip().splitlines()) == 1


ODD_IMAGES = {
    "1x1": lambda: Image.new("RGB", (1, 1), (255, 0, 0)),
    "2000x1": lambda: Image.new("RGB", (2000, 1), (0, 255, 0)),
    "1x3000": lambda: Image.new("RGB", (1, 3000), (0, 0, 255)),
    "grayscale": lambda: Image.new("L", (30, 20), 128),
    "1-bit": lambda: Image.new("1", (9, 5), 1),
    "grayscale+alpha": lambda: Image.new("LA", (9, 5), (10, 20)),
    "RGBA": lambda: Image.new("RGBA", (30, 20), (10, 20, 30, 0)),
    "CMYK": lambda: Image.new("CMYK", (30, 20), (10, 20, 30, 40)),
    "16-bit": lambda: Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16)),
    "palette": lambda: Image.new("P", (9, 5), 3),
}


def test_odd_inputs_work(paths, tmp_path):
    """Odd but valid: every image mode and extreme shape, an animated GIF, emoji and CJK text, top-k
    above the vocabulary (all tokens, as 0), a seed of 2**64 - 1."""
    files = []
    for name, make in ODD_IMAGES.items():
        files.append(tmp_path / f"{name}.{'jpg' if name == 'CMYK' else 'png'}")
        make().save(files[-1])
    frames = [Image.new("P", (10, 10), i) for i in range(3)]
    frames[0].save(tmp_path / "animated.gif", save_all=True, append_images=frames[1:])
    files.append(tmp_path / "animated.gif")
    images = [a for f in files for a in ("--image", str(f))]
    code, out, err = run(["generate", "--model", str(paths["model"]), *images, "--prompt", "😀 这是什么? ça va",
                          "--max-tokens", "2", "--top-k", "100000", "--seed", str(2**64 - 1)], None)  # fmt: skip
    assert code == 0, err
    code, out, err = run(["chat", "--model", str(paths["model"]), "--max-tokens", "2"], "😀 emoji?\n\n/image " + str(files[0]) + "\nwhat?\n")
    assert code == 0 and not err and len(out.splitlines()) == 2, err


# ---------------------------------------------------------------------------------------------
# The Python API: cumo_mlx.load, generate, stream_generate, ChatSession
# ---------------------------------------------------------------------------------------------

API_ROWS = {  # case: (call(api, paths), error type, message fragment)
    "load: missing directory": (lambda a, p: a.load(p["tmp"] / "nowhere"), "CuMoError", "model directory not found"),
    "load: a file": (lambda a, p: a.load(p["files"] / "notes.txt"), "CuMoError", "is a file"),
    "load: config not JSON": (lambda a, p: a.load(p["m"] / "config-not-json"), "ConfigError", "is not valid JSON"),
    "load: unknown model_type": (lambda a, p: a.load(p["m"] / "config-unknown-type"), "ConfigError", "unknown model_type"),
    "load: truncated weights": (lambda a, p: a.load(p["m"] / "weights-truncated"), "CheckpointError", "cannot load the weights"),
    "load: hub id offline": (lambda a, p: a.load("nobody-here/no-such-cumo"), "CuMoError", "not in the local Hugging Face cache"),
    "load: bad dtype": (lambda a, p: a.load(p["model"], dtype="float8"), "CuMoError", "dtype"),
    "generate: empty prompt": (lambda a, p: a.generate(*a.loaded, ""), "CuMoError", "the prompt is empty"),
    "generate: undecodable prompt": (lambda a, p: a.generate(*a.loaded, "\udcff?"), "CuMoError", "not valid UTF-8"),
    "generate: empty prompt ids": (lambda a, p: a.generate(*a.loaded, []), "CuMoError", "the prompt is empty"),
    "generate: placeholder without image": (lambda a, p: a.generate(*a.loaded, [1, -200, 5]), "CuMoError", "1 image placeholder(s) but 0"),
    "generate: image without placeholder": (lambda a, p: a.generate(*a.loaded, [1, 5], p["good_image"]), "CuMoError", "0 image placeholder(s) but 1"),
    "generate: missing image": (lambda a, p: a.generate(*a.loaded, "hi", p["tmp"] / "x.png"), "ImageError", "image file not found"),
    "generate: not an image": (lambda a, p: a.generate(*a.loaded, "hi", p["files"] / "notes.png"), "ImageError", "cannot read"),
    "generate: max_tokens 0": (lambda a, p: a.generate(*a.loaded, "hi", max_tokens=0), "CuMoError", "max_tokens"),
    "generate: temp nan": (lambda a, p: a.generate(*a.loaded, "hi", temp=float("nan")), "CuMoError", "temp"),
    "generate: top_p 0": (lambda a, p: a.generate(*a.loaded, "hi", top_p=0.0), "CuMoError", "top_p"),
    "generate: prompt id past the vocabulary": (lambda a, p: a.generate(*a.loaded, [1, 100000, 5]), "CuMoError", "outside the vocabulary"),
    "generate: negative prompt id": (lambda a, p: a.generate(*a.loaded, [1, -1, 5]), "CuMoError", "outside the vocabulary"),
    "generate: prompt id a float": (lambda a, p: a.generate(*a.loaded, [1, 2.5]), "CuMoError", "is not an integer"),
    "generate: max_tokens 2.5": (lambda a, p: a.generate(*a.loaded, "hi", max_tokens=2.5), "CuMoError", "max_tokens must be an integer"),
    "generate: max_tokens True": (lambda a, p: a.generate(*a.loaded, "hi", max_tokens=True), "CuMoError", "max_tokens must be an integer"),
    "generate: temp a string": (lambda a, p: a.generate(*a.loaded, "hi", temp="hot"), "CuMoError", "temp must be a number"),
    "generate: logit_bias past the vocabulary": (lambda a, p: a.generate(*a.loaded, "hi", logit_bias={10**6: 1.0}), "CuMoError", "outside the vocabulary"),
    "generate: logit_bias not a mapping": (lambda a, p: a.generate(*a.loaded, "hi", logit_bias=[1]), "CuMoError", "logit_bias must map"),
    "ChatSession: max_tokens 2.5": (lambda a, p: list(a.ChatSession(*a.loaded).stream("hi", max_tokens=2.5)), "CuMoError", "max_tokens must be an integer"),
    "generate: kv_group_size vs head size": (lambda a, p: a.generate(*a.loaded, "hi", kv_bits=4, kv_group_size=32), "CuMoError", "does not divide"),
    "generate: past the context": (lambda a, p: a.generate(*a.loaded, "red " * 5000), "CuMoError", "over the model's context"),
    "stream_generate: past the context": (lambda a, p: list(a.stream_generate(*a.loaded, "red " * 5000)), "CuMoError", "over the model's context"),
    "ChatSession: missing image": (lambda a, p: a.ChatSession(*a.loaded).add_image(p["tmp"] / "x.png"), "ImageError", "image file not found"),
    "ChatSession: empty question": (lambda a, p: list(a.ChatSession(*a.loaded).stream(" ")), "CuMoError", "the prompt is empty"),
    "ChatSession: placeholder without image": (lambda a, p: list(a.ChatSession(*a.loaded).stream("<image> what?")), "CuMoError", "but 0 image"),
    "ChatSession: past the context": (lambda a, p: list(a.ChatSession(*a.loaded).stream("red " * 5000)), "CuMoError", "over the model's context"),
}  # fmt: skip


class Api:
    """What the API rows call: the package's functions and a loaded tiny model."""

    def __init__(self, paths):
        import cumo_mlx
        from cumo_mlx.generate import ChatSession

        self.load, self.generate, self.stream_generate, self.ChatSession = (
            cumo_mlx.load, cumo_mlx.generate, cumo_mlx.stream_generate, ChatSession,
        )  # fmt: skip
        self.loaded = cumo_mlx.load(paths["model"])


@pytest.fixture(scope="module")
def api(paths):
    return Api(paths)


@pytest.mark.parametrize("case", API_ROWS)
def test_api_bad_input(case, api, paths, tmp_path, offline_hub):
    from cumo_mlx import errors

    call, error, fragment = API_ROWS[case]
    greedy = dict(max_tokens=3, temp=0.0)
    before = api.generate(*api.loaded, "What colour?", **greedy)
    with pytest.raises(getattr(errors, error), match=None) as caught:
        call(api, {**paths, "tmp": tmp_path})
    assert fragment in str(caught.value) and caught.value.fix
    assert api.generate(*api.loaded, "What colour?", **greedy) == before  # the model still works the same


def test_api_top_k_above_the_vocabulary_keeps_working(api):
    """mlx-lm raises inside a compiled sampler for top_k >= vocabulary, which broke every later call
    in the process; it means "all tokens" (as 0) here."""
    vocabulary = api.loaded[0].args.text_config.vocab_size
    for top_k in (vocabulary, 10 * vocabulary, 0):
        assert api.generate(*api.loaded, "What colour?", max_tokens=3, temp=1.0, top_k=top_k) is not None


@pytest.mark.parametrize("command", [*BASE, "data"])
def test_help_of_every_command(command):
    code, out, err = run([*command.split(), "--help"], None)
    assert code == 0 and out.startswith("Usage: cumo-mlx") and not err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file whatever its mode: the patched-open rows cover this")
def test_really_unreadable_files(paths, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(paths["model"], model)
    image = tmp_path / "image.png"
    shutil.copyfile(paths["good_image"], image)
    for path in (model / "config.json", image):
        path.chmod(0)
    for args, fragment in ((["--model", model], "cannot read"), (["--model", paths["model"], "--image", image], "permission denied")):
        code, _, err = run(["generate", *map(str, args), "--prompt", "hi"], None)
        assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
