"""Load and save CuMo models in MLX layout.

An MLX CuMo directory holds `config.json` (the original's fields plus the embedded
`vision_config` and any `quantization`), `model*.safetensors` (+ index when sharded) and the
tokenizer files. Weight loading, quantized-layer rebuilding and sharded saving are mlx-lm's.
"""

import json
import shutil
import sys
import warnings
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map
from mlx_lm.tokenizer_utils import load as load_tokenizer
from mlx_lm.utils import load_model as mlx_lm_load_model
from mlx_lm.utils import save_model

from . import hub
from .convert.convert import convert
from .errors import CheckpointError, CuMoError
from .models.config import JSON_MAX_BYTES, ModelArgs, load_config
from .models.model import Model
from .paths import regular_file
from .processor import Processor, SlowLlamaEncoder
from .staging import staged_directory

DEMO_PATH = Path(__file__).parent / "demo"


def resolve_model_path(path_or_repo: Union[str, Path]) -> Path:
    """A local MLX model directory for `demo`, a local path, or a hub id (see `_hub_model`)."""
    name = str(path_or_repo)
    if name == "demo":
        return DEMO_PATH
    path = hub.local_directory(name, "model")
    return path if path is not None else _hub_model(name)


def _hub_model(repo_id: str) -> Path:
    """An MLX model directory for a hub id: the repo itself if in MLX layout, else its 4-bit conversion
    in the cache (`hub.converted_path`), made on first use."""
    target = hub.converted_path(repo_id)
    if (target / "config.json").is_file():
        return target
    is_mlx = hub.is_mlx_repo(repo_id)
    if is_mlx:
        return hub.download_model(repo_id)
    if is_mlx is not None:  # (None: its config is out of reach, the conversion reports why)
        how = f"converting to MLX ({hub.DEFAULT_BITS}-bit) into {target} (once; later loads reuse it)"
        print(f"{repo_id}: {how}", file=sys.stderr)
    try:
        summary = convert(repo_id, str(target), quantize=True, q_bits=hub.DEFAULT_BITS)
    except CuMoError:
        if (target / "config.json").is_file():  # another process finished the same conversion first
            return target
        raise
    print(summary.line(), file=sys.stderr)
    return target


def _check_files(paths: list, max_bytes: Optional[int] = None) -> None:
    """A model directory's files are regular files (a FIFO would block the read forever); a directory
    in their place fails where it is read, as any unreadable file does."""
    for path in paths:
        if not path.is_dir():
            regular_file(path, path.name, max_bytes, CheckpointError)


def compute_dtype(dtype: Optional[str]) -> Optional[mx.Dtype]:
    """The dtype to run floating-point weights in: `dtype` if given, else float32 on the CPU backend
    (its half-precision matmuls have no BLAS path and run ~40x slower), else the stored dtype (None)."""
    if dtype is not None:
        if dtype not in ("float16", "bfloat16", "float32"):
            raise CuMoError(f"unsupported dtype {dtype!r}", "use float16, bfloat16 or float32")
        return getattr(mx, dtype)
    return mx.float32 if mx.default_device() == mx.cpu else None


def cast_floating(model: nn.Module, dtype: mx.Dtype) -> None:
    """Cast floating-point parameters (quantization scales included) to `dtype`, lazily."""
    model.update(tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p, model.parameters()))


def load_model(model_path: Path, lazy: bool = False, dtype: Optional[str] = None) -> tuple[Model, ModelArgs]:
    """The model in `model_path` (MLX layout). Weights keep their stored dtype, except as `compute_dtype` says."""
    config = load_config(model_path)
    if "vision_config" not in config:
        raise CheckpointError(
            f"{model_path} is not in MLX layout (its config.json has no vision_config)",
            f"convert it first: cumo-mlx convert --hf-path {model_path} --mlx-path <output>",
        )
    args = ModelArgs.from_dict(config, model_path)
    weights = list(model_path.glob("model*.safetensors"))
    if not weights:
        raise CheckpointError(f"no model*.safetensors in {model_path}", "convert or re-download the model")
    _check_files(weights)
    try:
        model, _ = mlx_lm_load_model(model_path, lazy=True, get_model_classes=lambda config: (Model, ModelArgs))
        if (target := compute_dtype(dtype)) is not None:
            cast_floating(model, target)
        if not lazy:
            mx.eval(model.parameters())
    except CuMoError:
        raise
    except Exception as e:  # corrupt file, missing or unexpected tensors, wrong shapes
        raise CheckpointError(f"cannot load the weights in {model_path}: {e}", "re-convert or re-download the model") from None
    return model, args


def load_processor(model_path: Path, args: ModelArgs) -> Processor:
    if not any((model_path / name).exists() for name in ("tokenizer.json", "tokenizer.model")):
        raise CheckpointError(f"no tokenizer files in {model_path}", "copy tokenizer.model or tokenizer.json into it")
    _check_files([model_path / name for name in hub.TOKENIZER_FILES if (model_path / name).exists()], JSON_MAX_BYTES)
    _check_sentencepiece(model_path / "tokenizer.model")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "You are using a model of type llava_mistral to instantiate ..."
    try:
        with warnings.catch_warnings():  # FutureWarning on the config's rope_scaling, etc.
            warnings.filterwarnings("ignore", module=r"transformers(\.|$)")
            warnings.simplefilter("ignore", FutureWarning)
            # Never run Python shipped with a model (an `auto_map` in tokenizer_config.json); without an
            # explicit False, transformers asks on stdin, where a piped "y" would say yes.
            tokenizer = load_tokenizer(model_path, tokenizer_config_extra={"trust_remote_code": False})
            encoder = _slow_llama_encoder(model_path, tokenizer)
    except Exception as e:
        raise CheckpointError(f"cannot load the tokenizer in {model_path}: {e}", "check the tokenizer files") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    _check_vocabulary(model_path, tokenizer, encoder, args.text_config.vocab_size)
    # The context check is ours (`generate.context_length`); the tokenizer's limit would only warn
    # "Token indices sequence length is longer than ..." on stderr for a long text.
    tokenizer._tokenizer.model_max_length = sys.maxsize
    return Processor(tokenizer, args, encoder)


def _check_sentencepiece(model_file: Path) -> None:
    """A tokenizer.model that SentencePiece cannot read is reported as such (transformers would go on
    to try it as a tiktoken file and say "tiktoken is required")."""
    if not model_file.is_file():
        return  # (none, or a directory: the tokenizer's loading reports that)
    import sentencepiece as spm

    try:
        spm.SentencePieceProcessor(model_proto=model_file.read_bytes())
    except Exception:
        raise CheckpointError(
            f"{model_file} is not a SentencePiece tokenizer model (corrupt or truncated)",
            "copy the checkpoint's tokenizer.model again",
        ) from None


def _check_vocabulary(model_path: Path, tokenizer, encoder: Optional[SlowLlamaEncoder], vocab_size: int) -> None:
    """Every id the tokenizer can give must index the embedding: MLX does not check a lookup's
    indices, so a larger tokenizer would read past the table."""
    size = len(tokenizer._tokenizer)
    if encoder is not None:
        size = max(size, encoder.sp.get_piece_size(), max(encoder.special_tokens.values(), default=-1) + 1)
    if size > vocab_size:
        raise CheckpointError(
            f"the tokenizer in {model_path} has {size} tokens, more than the model's vocabulary of {vocab_size}",
            "use the tokenizer files the model was trained with",
        )


def _slow_llama_encoder(model_path: Path, tokenizer) -> Optional[SlowLlamaEncoder]:
    """The original's slow Llama tokenizer on `tokenizer.model`, when the checkpoint has one."""
    model_file = model_path / "tokenizer.model"
    if not model_file.exists():
        return None
    config_file = model_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
    if config.get("tokenizer_class", "LlamaTokenizer") not in ("LlamaTokenizer", "LlamaTokenizerFast"):
        return None
    return SlowLlamaEncoder(
        model_file,
        special_tokens=tokenizer.added_tokens_encoder,
        unk_token=str(tokenizer.unk_token),
        bos_id=tokenizer.bos_token_id if config.get("add_bos_token", True) else None,
        eos_id=tokenizer.eos_token_id if config.get("add_eos_token", False) else None,
        legacy=config.get("legacy") is not False,  # the slow tokenizer's default (None) is legacy
    )


def load(
    path_or_repo: Union[str, Path] = "demo", lazy: bool = False, dtype: Optional[str] = None
) -> tuple[Model, Processor]:
    """Load a CuMo model and its processor: `"demo"`, an MLX model directory, or a hub id.

    dtype: "float16", "bfloat16" or "float32" to run the weights in; by default float32 on the CPU
    backend and the stored dtype elsewhere.
    """
    model_path = resolve_model_path(path_or_repo)
    model, args = load_model(model_path, lazy=lazy, dtype=dtype)
    return model, load_processor(model_path, args)


def save(
    path: Union[str, Path],
    model: Model,
    tokenizer_source: Optional[Path] = None,
    extra_config: Optional[dict] = None,
) -> None:
    """Write `model` in MLX layout to `path`, with the tokenizer files copied from `tokenizer_source`.

    The files are staged and moved in only once all are written, config.json last; the shards of a
    model saved there before go too. A failure (a full disk) leaves what `path` held as it was.
    """
    path = Path(path)
    shards = ("model*.safetensors", "model.safetensors.index.json")
    with staged_directory(path, merge=True, last="config.json", stale=shards) as staged:
        try:
            save_model(staged, model)
            config = model.args.to_dict()
            config.update(extra_config or {})
            (staged / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            for name in hub.TOKENIZER_FILES if tokenizer_source is not None else ():
                if (tokenizer_source / name).exists():
                    shutil.copyfile(tokenizer_source / name, staged / name)
        except (OSError, RuntimeError) as e:  # MLX reports a failed write as a RuntimeError
            raise CuMoError(
                f"cannot write the model to {path}: {e}", f"check the free space and permissions; {path} is unchanged"
            ) from None
