"""The tiny demo CuMo: its config, its tokenizer, and a randomly initialised starting checkpoint.

The demo is trained from scratch on the synthetic shapes dataset (`cumo_mlx.shapes`) by the
three-stage recipe in `demo_recipe/recipe.py`. Sizes are chosen for a 2-core CPU:

- vision: CLIP ViT, 96 px images, 12 px patches (8x8 = 64 patches), width 96, MLP 384, 3 layers
  (the features are the state entering the last layer, so 2 run at inference), S2 scales [1, 2];
- connector: `mlp2x_gelu` (dense stages), `smoe_mlp` with 4 experts, top-2, after upcycling;
- LLM: Mistral, width 128, 4 layers, 4 heads (2 KV heads), SwiGLU 384;
- tokenizer: a byte-fallback BPE built here for the dataset's vocabulary and the templates.

`demo_config(moe=False)` is the dense model of stages 1-2; `demo_config(moe=True)` is what
`cumo-mlx upcycle --num-experts 4 --top-k 2` makes of it (CLIP-MoE and MoE connector).
"""

import json
import re
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from cumo_mlx import shapes
from cumo_mlx.prompt import IMAGE_PLACEHOLDER, chat_prompt, plain_prompt

NUM_EXPERTS, TOP_K = 4, 2
IMAGE_SIZE, PATCH_SIZE = 96, 12
SCALES = [1, 2]

DEMO_VISION = {
    "hidden_size": 96,
    "intermediate_size": 384,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "patch_size": PATCH_SIZE,
    "image_size": IMAGE_SIZE,
    "shortest_edge": IMAGE_SIZE,
    "crop_size": IMAGE_SIZE,
    "num_channels": 3,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}

DEMO_TEXT = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 1024,
    "sliding_window": None,
    "tie_word_embeddings": False,
}

# Special tokens as in Llama/Mistral; 256 byte tokens follow them, then the learned pieces.
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))
MAX_LENGTH = 512


def demo_config(moe: bool = False, vocab_size: Optional[int] = None) -> dict:
    """The demo's config.json (flat CuMo layout with `vision_config` embedded).

    moe=False: dense CLIP and `mlp2x_gelu` connector (stages 1-2); moe=True: the upcycled model
    (CLIP-MoE and `smoe_mlp`, 4 experts, top-2). `vocab_size` defaults to the demo tokenizer's.
    """
    if vocab_size is None:
        vocab_size = tokenizer_vocab_size()
    return {
        "model_type": "llava_mistral",
        "architectures": ["LlavaMistralForCausalLM"],
        **DEMO_TEXT,
        "vocab_size": vocab_size,
        "mm_vision_tower": "cumo-demo-clip",
        "vision_config": dict(DEMO_VISION),
        "mm_hidden_size": DEMO_VISION["hidden_size"],
        "scales": list(SCALES),
        "mm_projector_type": "smoe_mlp" if moe else "mlp2x_gelu",
        "mlp_smoe": moe,
        "clip_smoe": moe,
        "num_experts": NUM_EXPERTS,
        "num_selected": TOP_K,
        "image_aspect_ratio": "pad",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "flat",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "balance_loss_coef": 0.1,
        "router_z_loss_coef": 0.01,
        "tokenizer_model_max_length": MAX_LENGTH,
        "tokenizer_padding_side": "right",
    }


# --- tokenizer -------------------------------------------------------------------------------


def vocabulary_texts() -> Iterator[str]:
    """Every question, answer and caption form the dataset can produce (for the demo tokenizer)."""
    yield "What shape is this?"
    yield "How many shapes are there?"
    yield "What is the largest shape?"
    yield shapes.CAPTION_QUESTION
    yield from ("yes", "no", *shapes.COUNT_WORDS.values(), *shapes.SHAPES, *shapes.COLOURS, "0 1 2 3 4 5 6 7 8 9")
    for shape in shapes.SHAPES:
        yield f"What colour is the {shape}?"
        yield f"What color is the {shape}?"
        for colour in shapes.COLOURS:
            yield f"Is there {shapes.with_article(colour)} {shape}?"
            yield f"{shapes.with_article(colour).capitalize()} {shape}."
            yield f"{shapes.with_article(colour).capitalize()} {shape}, {shapes.with_article(colour)} {shape} and {shapes.with_article(colour)} {shape}."


def tokenizer_corpus() -> list[str]:
    """The text pieces the tokenizer will see: prompts in both templates, cut at `<image>` (as
    the Processor does) and at special tokens (as the tokenizer does before normalizing)."""
    split = re.compile("|".join(re.escape(t) for t in (IMAGE_PLACEHOLDER, *SPECIAL_TOKENS)))
    pieces = []
    for text in vocabulary_texts():
        question = f"{IMAGE_PLACEHOLDER}\n{text}"
        for prompt in (
            chat_prompt([question, "yes", text, text]),  # first and later turns, answers
            plain_prompt(text),
        ):
            pieces.extend(p for p in split.split(prompt) if p)
    return pieces


def _pipeline():
    """Normalizer, pre-tokenizer and decoder shared by training and the saved tokenizer.

    Llama-style: a leading "▁" and spaces as "▁" (normalizer), Llama's decoder (so mlx-lm picks its
    SentencePiece streaming detokenizer). Words are split at "▁", newlines and punctuation.
    """
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers

    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("▁[^▁\\n?.,!']*|\\n|[?.,!']|[^▁\\n?.,!']+"), behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return normalizer, pre_tokenizer, decoder


def build_tokenizer():
    """The demo tokenizer (a `tokenizers.Tokenizer`), built deterministically.

    Ids: <unk> 0, <s> 1, </s> 2, the 256 byte-fallback tokens <0x00>..<0xFF> 3-258 (any text
    encodes), then BPE pieces learned on `tokenizer_corpus()` until every word is one piece.
    """
    from tokenizers import AddedToken, Tokenizer, models, processors, trainers

    normalizer, pre_tokenizer, decoder = _pipeline()
    trainer_model = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_model.normalizer = normalizer
    trainer_model.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=100_000, min_frequency=1, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    trainer_model.train_from_iterator(tokenizer_corpus(), trainer)
    trained = json.loads(trainer_model.to_str())["model"]
    learned = sorted((i, t) for t, i in trained["vocab"].items() if t not in SPECIAL_TOKENS)
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + BYTE_TOKENS)}
    for _, token in learned:
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoder
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tokenizer


def tokenizer_vocab_size() -> int:
    return build_tokenizer().get_vocab_size()


def write_tokenizer(directory: Path) -> Path:
    """Save the demo tokenizer as tokenizer.json + tokenizer_config.json + special_tokens_map.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_LENGTH,
        "padding_side": "right",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return directory


# --- the vision tower's starting point ----------------------------------------------------------
# A randomly initialised ViT learns the shapes' geometry only once it has learnt to ignore which of the
# 8 x 7 colour pairs draws them (the sign of every edge response flips with the pair): measured on this
# dataset it stays at chance on "What shape is this?" for ~90,000 images, three times what the recipe
# can show it in 30 minutes. So CLIP starts as a colour-invariant edge detector instead, the role a
# pretrained CLIP plays in the real CuMo, and the recipe fine-tunes it (at a lower rate than the rest).
COLOUR_DIMS = 24  # patch-embedding outputs that read a patch's mean colour
DCT_ORDER = 4  # edge patterns: the 2-D DCT basis functions below this order per axis, constant excluded
COLOUR_PROJECTIONS = 4  # random colour directions each edge energy sums over
EDGE_GAIN, MLP_GAIN, ENERGY_GAIN = 0.8, 4.0, 1.0  # the scales that gave the best linear probe of shape


def edge_patterns(patch_size: int) -> list:
    """Zero-mean, unit-norm 2-D DCT basis functions [patch, patch] up to DCT_ORDER - 1 per axis."""
    cosine = lambda k: np.cos(np.pi * (np.arange(patch_size) + 0.5) * k / patch_size)
    patterns = [np.outer(cosine(v), cosine(u)) for u in range(DCT_ORDER) for v in range(DCT_ORDER) if u or v]
    return [p / np.linalg.norm(p) for p in patterns]


def edge_energy_init(clip, seed: int) -> None:
    """Set a dense CLIP's patch embedding and first layer to compute colour-invariant edge energies.

    Patch-embedding outputs: COLOUR_DIMS random projections of the patch's mean colour, then for each
    edge pattern p and channel c the response <p, patch_c> (zero on a plain patch; negated when the
    two colours of an edge swap). The first layer's attention starts silent, and its MLP's first units
    come in pairs (w, -w) reading <a, responses of p over the channels> for random colour directions a
    and writing, alone, to p's energy output with one shared weight: quick_gelu(z) + quick_gelu(-z) =
    z tanh(0.85 z) ~ |z|, so the energy does not depend on which colour lies on which side. Every other
    weight keeps its random initialisation.
    """
    import mlx.core as mx

    config = clip.config
    rng = np.random.default_rng(seed)
    patterns = edge_patterns(config.patch_size)
    first_edge = COLOUR_DIMS
    first_energy = first_edge + 3 * len(patterns)
    if first_energy + len(patterns) > config.hidden_size or 2 * COLOUR_PROJECTIONS * len(patterns) > config.intermediate_size:
        raise ValueError("the vision tower is too narrow for the edge-energy initialisation")

    def unit(n: int) -> np.ndarray:
        v = rng.normal(size=n)
        return v / np.linalg.norm(v)

    patch = np.zeros((config.hidden_size, config.patch_size, config.patch_size, 3), np.float32)  # MLX conv layout
    for out in range(COLOUR_DIMS):
        patch[out] = unit(3) / config.patch_size**2
    for k, pattern in enumerate(patterns):
        for channel in range(3):
            patch[first_edge + 3 * k + channel, :, :, channel] = EDGE_GAIN * pattern
    clip.embeddings.patch_embedding.weight = mx.array(patch)

    layer = clip.encoder.layers[0]
    layer.self_attn.out_proj.weight = mx.zeros_like(layer.self_attn.out_proj.weight)
    layer.self_attn.out_proj.bias = mx.zeros_like(layer.self_attn.out_proj.bias)
    fc1, fc1_bias, fc2 = (np.array(w) for w in (layer.mlp.fc1.weight, layer.mlp.fc1.bias, layer.mlp.fc2.weight))
    fc2[first_energy : first_energy + len(patterns)] = 0.0  # the energy outputs come from the pairs alone
    unit_index = 0
    for k in range(len(patterns)):
        edge = slice(first_edge + 3 * k, first_edge + 3 * k + 3)
        for _ in range(COLOUR_PROJECTIONS):
            direction = unit(3)
            for sign in (1.0, -1.0):
                fc1[unit_index] = 0.0
                fc1[unit_index, edge] = sign * MLP_GAIN * direction
                fc1_bias[unit_index] = 0.0
                fc2[:, unit_index] = 0.0
                fc2[first_energy + k, unit_index] = ENERGY_GAIN
                unit_index += 1
    layer.mlp.fc1.weight, layer.mlp.fc1.bias, layer.mlp.fc2.weight = (mx.array(w) for w in (fc1, fc1_bias, fc2))


def write_initial_model(directory: Path, seed: int = 0) -> Path:
    """The dense demo model's starting point in MLX layout (float32) with the demo tokenizer: random
    weights, but for CLIP's edge-energy start (`edge_energy_init`). What `cumo-mlx train --stage
    pretrain` starts from."""
    import mlx.core as mx
    from cumo_mlx.loader import save
    from cumo_mlx.models.config import ModelArgs
    from cumo_mlx.models.model import Model

    directory = write_tokenizer(directory)
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(demo_config(moe=False)))
    edge_energy_init(model.vision_tower.vision_model, seed)
    mx.eval(model.parameters())
    save(directory, model, extra_config={"tokenizer_padding_side": "right"})
    return directory
