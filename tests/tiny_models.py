"""Tiny CuMo configs, tokenizers and MLX checkpoints built inside the tests (nothing is downloaded)."""

import io
import json
from pathlib import Path

import sentencepiece as spm

# A vocabulary that covers the templates and the words the tests use.
TOKENIZER_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "What shape is this? circle square triangle star. What colour is the circle? What color is it?",
    "red green blue yellow purple orange white black. How many shapes are there? one two three",
    "[INST] <<SYS>> <</SYS>> [/INST] Is there a red circle? yes no. Describe the image in detail.",
]

TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "patch_size": 4,
    "image_size": 16,
    "shortest_edge": 16,
    "crop_size": 16,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}


def tiny_config(
    llm: str = "mistral",
    clip_smoe: bool = True,
    connector: str = "smoe_mlp",
    scales=(1, 3),
    num_experts: int = 4,
    num_selected: int = 2,
    vocab_size: int = 400,
    embed_vision: bool = True,
) -> dict:
    """A CuMo config.json in the original's flat layout; `vision_config` embedded unless told not to."""
    config = {
        "model_type": f"llava_{llm}",
        "architectures": [f"Llava{llm.capitalize()}ForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "sliding_window": None,
        "vocab_size": vocab_size,
        "tie_word_embeddings": False,
        "max_position_embeddings": 4096,
        "mm_vision_tower": "tiny-clip",
        "scales": list(scales),
        "mm_hidden_size": TINY_VISION["hidden_size"],
        "mm_projector_type": connector,
        "mlp_smoe": connector == "smoe_mlp",
        "clip_smoe": clip_smoe,
        "num_experts": num_experts,
        "num_selected": num_selected,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "flat",
        "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "balance_loss_coef": 0.1,
        "router_z_loss_coef": 0.01,
        "tokenizer_model_max_length": 4096,
        "tokenizer_padding_side": "right",
        "training": True,
    }
    if llm == "mixtral":
        config.update(num_local_experts=4, num_experts_per_tok=2)
    if embed_vision:
        config["vision_config"] = dict(TINY_VISION)
    return config


def write_tokenizer(directory: Path, legacy: bool = False, vocab_size: int = 400) -> Path:
    """A Llama/Mistral-style SentencePiece tokenizer (unk 0, bos 1, eos 2) as the checkpoints ship it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TOKENIZER_CORPUS * 20),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "legacy": legacy,
        "model_max_length": 4096,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return directory


def write_mlx_model(directory: Path, config: dict, seed: int = 0) -> Path:
    """A randomly initialised CuMo in MLX layout (float32), with a tokenizer."""
    import mlx.core as mx
    from cumo_mlx.loader import save
    from cumo_mlx.models.config import ModelArgs
    from cumo_mlx.models.model import Model

    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    write_tokenizer(directory)
    save(directory, model)
    return Path(directory)


def write_text_model(directory: Path, config: dict) -> Path:
    """A tiny CuMo whose LM head cannot pick special or byte-fallback pieces (their rows are 0):
    greedy answers are plain text that never ends on its own (tests force `</s>` where needed)."""
    import cumo_mlx
    import mlx.core as mx
    from cumo_mlx.loader import save

    write_mlx_model(directory, config)
    model, processor = cumo_mlx.load(directory)
    pieces = processor.tokenizer.convert_ids_to_tokens(list(range(config["vocab_size"])))
    blocked = mx.array([i for i, piece in enumerate(pieces) if i < 3 or piece.startswith("<0x")])
    weight = model.language_model.lm_head.weight
    weight[blocked] = 0
    model.language_model.lm_head.weight = weight
    save(directory, model, tokenizer_source=directory)
    return directory
