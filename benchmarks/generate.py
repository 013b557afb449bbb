"""Generation speed and memory: our language model next to mlx-lm's, an image's encode + prefill,
and the peak memory of a whole 4-bit CuMo-7B.

    python benchmarks/generate.py [--quick] [--json] [--repeats 3] [--prompt 128] [--tokens 16]
        [--layers 2] [--mixtral-layers 1] [--image-repeats 2] [--parts llm,image,memory]

llm     Slices of Mistral-7B (--layers decoder layers) and Mixtral-8x7B (--mixtral-layers) at their
        real widths, random weights. Our `LanguageModel` and mlx-lm's own model (mlx_lm.models.llama,
        mlx_lm.models.mixtral) hold the same weight arrays. On the same --prompt random token ids:
        prefill tok/s (one forward of the prompt into a KV cache, every position of every layer
        evaluated), then decode tok/s of --tokens greedy tokens from that cache through mlx-lm's
        `generate_step` (the tokens after the first over their time), and peak memory. Float
        (float32 on the CPU backend, float16 on a GPU) and 4-bit, quantized as `cumo-mlx convert -q`
        does (group 64; routers stay float). Decoding reads every weight once per token (of
        Mixtral's experts the 2 of 8 chosen, on average), the final norm and lm_head, and the KV
        cache: those bytes x decode tok/s against the machine's copy bandwidth measured in the
        same run (harness.copy_bandwidth: read + written bytes/s of a numpy copy on all cores).
image   One image through CuMo-7B's vision side (CLIP-L/14-336 with 4-expert top-2 MoE MLPs, S2
        [1, 3]: 10 crops, 23 of the 24 layers run; the MoE connector), then the prefill of the
        prompt (system prompt + the image's 576 rows) through mlx-lm's generate_step with LLM slices
        of 1 and 2 layers. Its chunked prefill evaluates only the KV caches, so each added layer
        costs one full layer: the 32-layer prefill is t1 + 31 (t2 - t1). Float and 4-bit LLM (the
        vision side stays float, as the converter leaves it).
memory  Peak memory of a whole CuMo-Mistral-7B as `cumo-mlx convert -q` makes it (LLM 4-bit,
        vision tower and connector 8-bit, other floats float16) = the exact bytes of its weights
        (counted on a lazy full-size model quantized as the converter does: nothing allocated) +
        the working memory of the float `image` run with 2 layers (its peak minus its weights:
        image features, activations, the KV cache of 2 layers, in float32, so an upper bound of
        float16's) + the float16 KV cache of the other 30 layers for the prompt and
        --memory-tokens generated tokens. Also with the vision side float16 (--no-quantize-vision) and 4-bit
        (--vision-bits 4).

The CPU backend's quantized matmul has no fast kernel (~1.4 GFLOP/s here, linear in the rows), so
there the 4-bit prompts are shorter (--quantized-prompt, --quantized-positions) and the 4-bit
image prefill is reported per token.
"""

import time
from contextlib import contextmanager
from typing import Optional
from statistics import median

import harness
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from cumo_mlx.convert.convert import VISION_BITS, quantization_plan
from cumo_mlx.models.config import ModelArgs, TextConfig
from cumo_mlx.models.language import LanguageModel
from cumo_mlx.models.model import Model
from cumo_mlx.prompt import IMAGE_TOKEN_INDEX
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.models import llama, mixtral
from mlx_lm.models.cache import make_prompt_cache

GB = harness.GB
Q_BITS, Q_GROUP = 4, 64
MIXTRAL = {**harness.MISTRAL_7B, "num_local_experts": 8, "num_experts_per_tok": 2}
COMMON = {"vocab_size": 32000, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "tie_word_embeddings": False}
LLM_LAYERS = 32
QUICK_VISION = {**harness.QUICK_CLIP, "num_hidden_layers": 3, "shortest_edge": 56, "crop_size": 56}
# Text positions of the default prompt around the image: "<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n"
# before, "\n{question} [/INST]" after (the question ~12 tokens).
TEXT_BEFORE, TEXT_AFTER = 48, 16


def float_dtype() -> mx.Dtype:
    return mx.float32 if mx.default_device() == mx.cpu else mx.float16


def quantize(model: nn.Module) -> None:
    quantization_plan(model, Q_BITS, Q_GROUP, vision_bits=None)


def weight_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


# ------------------------------------------------------------------------------------------------
# llm: ours vs mlx-lm's on the same weights
# ------------------------------------------------------------------------------------------------


def llm_pair(moe: bool, layers: int, widths: dict):
    """mlx-lm's model and ours, with the same (shared) random weights."""
    fields = {**widths, **COMMON, "num_hidden_layers": layers}
    if moe:
        theirs = mixtral.Model(mixtral.ModelArgs(model_type="mixtral", **fields))
    else:
        fields = {k: v for k, v in fields.items() if k not in ("num_local_experts", "num_experts_per_tok")}
        theirs = llama.Model(llama.ModelArgs(model_type="llama", **fields))
    theirs.set_dtype(float_dtype())
    mx.eval(theirs.parameters())
    ours = LanguageModel(TextConfig(**fields))
    share_weights(ours, theirs)
    return ours, theirs


def share_weights(ours: LanguageModel, theirs: nn.Module) -> None:
    """Point our parameters at mlx-lm's arrays (its Mixtral experts are `switch_mlp`, ours `experts`)."""
    ours.load_weights([(k.replace(".switch_mlp.", ".experts."), v) for k, v in tree_flatten(theirs.parameters())])


def prefill(model: nn.Module, prompt: mx.array, cache: list) -> mx.array:
    """The prompt through every layer into `cache`, every position evaluated, and the last
    position's logits. (mlx-lm's chunked prefill evaluates only the KV cache of a chunk, which on
    a 1-2 layer slice would skip most of the last layer: the figure would not scale to 32 layers.)"""
    hidden = model.model(prompt[None], cache=cache)
    hidden = hidden[0] if isinstance(hidden, tuple) else hidden  # ours returns the routings too
    logits = model.lm_head(hidden[:, -1:])
    mx.eval(hidden, logits)
    return logits


def run_generation(model: nn.Module, prompt: mx.array, tokens: int) -> dict:
    """Prefill tok/s, then decode tok/s of `tokens` tokens through mlx-lm's generate_step; peak memory."""
    mx.eval(mx.zeros(1))
    mx.reset_peak_memory()
    cache = make_prompt_cache(model)
    tic = time.perf_counter()
    logits = prefill(model, prompt, cache)
    prefilled = time.perf_counter()
    first = mx.argmax(logits[0], axis=-1)
    stamps = [time.perf_counter() for _ in generate_step(first, model, prompt_cache=cache, max_tokens=tokens)]
    mx.synchronize()  # generate_step has computed one more token: not part of the figures
    return {
        "prefill_tps": prompt.size / (prefilled - tic),
        "decode_tps": (tokens - 1) / (stamps[-1] - stamps[0]),
        "peak_gb": mx.get_peak_memory() / GB,
    }


def decode_bytes_per_token(model: nn.Module, positions: float) -> float:
    """Bytes one decoded token reads: every decoder weight (of E experts the k chosen), the final
    norm and lm_head, and the KV cache of `positions` positions."""
    args = model.args
    experts = args.num_experts_per_tok / args.num_local_experts if getattr(args, "num_local_experts", None) else 1
    weights = sum(v.nbytes * (experts if ".experts." in k or ".switch_mlp." in k else 1)
                  for k, v in tree_flatten(model.parameters()) if "embed_tokens" not in k)  # fmt: skip
    kv_heads = args.num_key_value_heads
    head_dim = args.hidden_size // args.num_attention_heads
    kv = 2 * len(model.layers) * kv_heads * head_dim * positions * float_dtype().size
    return weights + kv


def add_bandwidth(figures: dict, per_token: float, copy_bytes_per_s: float) -> None:
    figures["decode_bytes_per_token"], figures["copy_bytes_per_s"] = per_token, copy_bytes_per_s
    for name in ("ours", "mlx-lm"):
        figures[name]["decode_bytes_per_s"] = per_token * figures[name]["decode_tps"]
        figures[name]["decode_of_copy_bandwidth"] = figures[name]["decode_bytes_per_s"] / copy_bytes_per_s


def llm_part(args, widths: dict) -> dict:
    prompt = mx.array(np.random.default_rng(0).integers(0, COMMON["vocab_size"], args.prompt))
    copy_before, results, per_token = harness.copy_bandwidth(), {}, {}
    for name, moe, layers in (("mistral", False, args.layers), ("mixtral", True, args.mixtral_layers)):
        experts = {"num_local_experts": 8, "num_experts_per_tok": 2} if moe else {}
        ours, theirs = llm_pair(moe, layers, {**widths, **experts})
        for precision, tokens in (("float", prompt), ("4-bit", prompt[: args.quantized_prompt])):
            if precision == "4-bit":
                quantize(theirs)
                quantize(ours)  # the same structure; then the same arrays as theirs
                share_weights(ours, theirs)
            models = {"ours": ours, "mlx-lm": theirs}
            cases = {impl: lambda m=m, t=tokens: run_generation(m, t, args.tokens) for impl, m in models.items()}
            figures = harness.run_cases(cases, args.repeats, args.budget)
            figures["prompt"] = tokens.size
            figures["decode_ratio"] = figures["ours"]["decode_tps"] / figures["mlx-lm"]["decode_tps"]
            figures["prefill_ratio"] = figures["ours"]["prefill_tps"] / figures["mlx-lm"]["prefill_tps"]
            case = f"{name} {layers}L {precision}"
            results[case], per_token[case] = figures, decode_bytes_per_token(ours, tokens.size + args.tokens / 2)
        del ours, theirs
    copy = max(copy_before, harness.copy_bandwidth())  # the better of a copy before and one after
    for case, figures in results.items():
        add_bandwidth(figures, per_token[case], copy)
    return results


# ------------------------------------------------------------------------------------------------
# image: vision encode + prefill at CuMo-7B dimensions
# ------------------------------------------------------------------------------------------------


def cumo_config(llm_layers: int, quick: bool) -> dict:
    llm = harness.QUICK_MISTRAL if quick else harness.MISTRAL_7B
    config = {"model_type": "llava_mistral", **llm, **COMMON, "num_hidden_layers": llm_layers, "scales": [1, 3],
              "mm_projector_type": "smoe_mlp", "clip_smoe": True, "num_experts": 4, "num_selected": 2}  # fmt: skip
    if quick:
        config.update(vision_config=QUICK_VISION, mm_hidden_size=QUICK_VISION["hidden_size"])
    else:
        config.update(vision_config={}, mm_hidden_size=1024)  # CLIP-L/14-336's defaults
    return config


def build_cumo(llm_layers: int, quick: bool, lazy: bool = False) -> Model:
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(cumo_config(llm_layers, quick)))
    model.set_dtype(float_dtype())
    if not lazy:
        mx.eval(model.parameters())
    return model


def prompt_ids() -> list[int]:
    text = np.random.default_rng(1).integers(3, COMMON["vocab_size"], TEXT_BEFORE + TEXT_AFTER).tolist()
    return [1, *text[:TEXT_BEFORE], IMAGE_TOKEN_INDEX, *text[TEXT_BEFORE:]]


def prefill_seconds(language_model: nn.Module, embeddings: mx.array) -> float:
    """Seconds from the prompt's embeddings to the first token, through mlx-lm's generate_step."""
    ids = mx.zeros(embeddings.shape[0], mx.int32)  # generate_step wants ids as long as the embeddings
    steps = generate_step(ids, language_model, max_tokens=1, input_embeddings=embeddings)
    tic = time.perf_counter()
    next(steps)
    seconds = time.perf_counter() - tic
    mx.synchronize()  # generate_step computes the next token already: not part of the figure
    return seconds


def encode_seconds(model: Model, pixels: mx.array) -> tuple[float, mx.array]:
    tic = time.perf_counter()
    features = model.encode_images(pixels).features
    mx.eval(features)
    return time.perf_counter() - tic, features


@contextmanager
def first_layers(model: Model, count: int):
    """`model` with only its first `count` LLM layers for the duration of the context."""
    layers = model.language_model.model.layers
    model.language_model.model.layers = layers[:count]
    try:
        yield
    finally:
        model.language_model.model.layers = layers


def image_part(args) -> dict:
    """The vision side's encode time; the prefill of the image prompt through 1 and 2 LLM layers,
    float and 4-bit (the 4-bit prefill over the first --quantized-positions positions)."""
    size = QUICK_VISION["image_size"] if args.quick else 336
    pixels = mx.random.normal((1, size, size, 3), key=mx.random.key(2))
    model = build_cumo(2, args.quick)
    weights = weight_bytes(model)
    ids = prompt_ids()
    encode, prefill = [], {1: [], 2: []}
    mx.reset_peak_memory()
    for run in range(1 + args.image_repeats):  # the first is a warm-up
        seconds, features = encode_seconds(model, pixels)
        embeddings = model.embed_inputs(ids, features)
        for layers in prefill:
            with first_layers(model, layers):
                prefill[layers].append(prefill_seconds(model.language_model, embeddings))
        encode.append(seconds)
    peak = mx.get_peak_memory()  # the float run with 2 layers: encode, prefill, the first token
    positions = embeddings.shape[0]
    results = {"encode_s": median(encode[1:]), "positions": positions, "runs": args.image_repeats,
               "float_peak_bytes": peak, "float_weights_bytes": weights}  # fmt: skip

    quantize(model)
    q_positions = min(args.quantized_positions or positions, positions)
    q_embeddings = model.embed_inputs(ids, features)[:q_positions]
    q_prefill = {1: [], 2: []}
    for run in range(1 + args.image_repeats):
        for layers in q_prefill:
            with first_layers(model, layers):
                q_prefill[layers].append(prefill_seconds(model.language_model, q_embeddings))
    for precision, times, count in (("float", prefill, positions), ("4-bit", q_prefill, q_positions)):
        one, two = median(times[1][1:]), median(times[2][1:])
        per_layer = max(two - one, 0.0)
        tps = count / (one + (LLM_LAYERS - 1) * per_layer)  # tok/s of the 32-layer LLM
        results[precision] = {"measured_positions": count, "prefill_1_layer_s": one, "prefill_2_layers_s": two,
                              "prefill_32_layers_tps": tps, "prefill_32_layers_s": positions / tps}  # fmt: skip
    return results


# ------------------------------------------------------------------------------------------------
# memory: a whole 4-bit CuMo-7B, estimated
# ------------------------------------------------------------------------------------------------


def full_model_weight_bytes(quick: bool, vision_bits: Optional[int]) -> dict:
    """Bytes of a whole 4-bit CuMo-7B's weights (float parts float16), counted on a lazy model."""
    model = build_cumo(LLM_LAYERS, quick, lazy=True)
    model.set_dtype(mx.float16)
    quantization_plan(model, Q_BITS, Q_GROUP, vision_bits)  # scales and biases float16, as converted
    parts = {"vision_tower": model.vision_tower, "connector": model.mm_projector, "llm": model.language_model}
    return {name: weight_bytes(module) for name, module in parts.items()}


def memory_part(image: dict, tokens: int, quick: bool) -> dict:
    llm = harness.QUICK_MISTRAL if quick else harness.MISTRAL_7B
    head_dim = llm["hidden_size"] // llm["num_attention_heads"]
    kv_per_layer = 2 * llm["num_key_value_heads"] * head_dim * (image["positions"] + tokens) * 2  # float16 K and V
    working = image["float_peak_bytes"] - image["float_weights_bytes"]
    rest = working + (LLM_LAYERS - 2) * kv_per_layer
    weights = {bits: full_model_weight_bytes(quick, bits) for bits in (VISION_BITS, None, 4)}
    return {
        "tokens": tokens,
        "weights_bytes": weights[VISION_BITS],
        "working_bytes": working,
        "kv_cache_other_layers_bytes": (LLM_LAYERS - 2) * kv_per_layer,
        "estimated_peak_bytes": sum(weights[VISION_BITS].values()) + rest,
        "estimated_peak_gb": (sum(weights[VISION_BITS].values()) + rest) / GB,
        "float16_vision_estimated_peak_gb": (sum(weights[None].values()) + rest) / GB,
        "4bit_vision_estimated_peak_gb": (sum(weights[4].values()) + rest) / GB,
    }


# ------------------------------------------------------------------------------------------------


def llm_report(results: dict, args) -> str:
    rows = []
    for case, figures in results.items():
        for name in ("ours", "mlx-lm"):
            f = figures[name]
            label = case if name == "ours" else ""
            rows.append([label, name, f["prefill_tps"], f["decode_tps"], f["decode_bytes_per_s"] / 1e9,
                         f["decode_of_copy_bandwidth"], f["peak_gb"], f["runs"]])  # fmt: skip
        rows.append(["", "ours / mlx-lm", figures["prefill_ratio"], figures["decode_ratio"], None, None, None, None])
    title = (
        f"LLM: prefill of {args.prompt} prompt tokens ({args.quantized_prompt} at 4-bit), "
        f"then {args.tokens} tokens decoded greedily by mlx-lm's generate_step; the machine's copy "
        f"bandwidth {next(iter(results.values()))['copy_bytes_per_s'] / 1e9:.1f} GB/s"
    )
    headers = ["model", "implementation", "prefill tok/s", "decode tok/s", "decode GB/s read", "of copy bandwidth",
               "peak GB", "runs"]  # fmt: skip
    return title + "\n" + harness.table(headers, rows)


def image_report(r: dict) -> str:
    rows = []
    for precision in ("float", "4-bit"):
        p = r[precision]
        first_token = r["encode_s"] + p["prefill_32_layers_s"]
        rows.append([precision, p["measured_positions"], p["prefill_1_layer_s"], p["prefill_2_layers_s"],
                     p["prefill_32_layers_tps"], p["prefill_32_layers_s"], first_token])  # fmt: skip
    title = (
        f"One image at CuMo-7B dimensions: vision encode (S2 [1, 3], CLIP-MoE, MoE connector, float) "
        f"{r['encode_s']:.2f} s, then the prefill of {r['positions']} positions:"
    )
    headers = ["LLM", "positions run", "1 layer s", "2 layers s", "32 layers tok/s (est.)", "32 layers s (est.)",
               "image -> first token s"]  # fmt: skip
    return title + "\n" + harness.table(headers, rows)


def memory_report(m: dict) -> str:
    w = {name: f"{size / GB:.2f} GB" for name, size in m["weights_bytes"].items()}
    return "\n".join([
        f"Peak memory of a whole CuMo-Mistral-7B from `convert -q` (LLM 4-bit, vision side {VISION_BITS}-bit) "
        f"answering one image with {m['tokens']} tokens, estimated:",
        f"  weights: LLM {w['llm']} + vision tower {w['vision_tower']} + connector {w['connector']} (exact)",
        f"  + working memory of one image and the prompt {m['working_bytes'] / GB:.2f} GB (measured, float32)",
        f"  + KV cache of the other {LLM_LAYERS - 2} layers {m['kv_cache_other_layers_bytes'] / GB:.2f} GB",
        f"  = {m['estimated_peak_gb']:.2f} GB",
        f"  (vision side float16, --no-quantize-vision: {m['float16_vision_estimated_peak_gb']:.2f} GB; "
        f"4-bit, --vision-bits 4: {m['4bit_vision_estimated_peak_gb']:.2f} GB)",
    ])  # fmt: skip


def main():
    p = harness.parser(__doc__.split("\n")[0], repeats=3)
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens of the llm part")
    p.add_argument("--tokens", type=int, default=16, help="tokens generated")
    p.add_argument("--memory-tokens", type=int, default=512, help="tokens generated in the memory estimate")
    p.add_argument("--quantized-prompt", type=int, default=None,
                   help="prompt tokens of the 4-bit llm runs [default: 16 on the CPU backend, else --prompt]")
    p.add_argument("--quantized-positions", type=int, default=None,
                   help="positions of the 4-bit image prefill [default: 64 on the CPU backend, else all]")
    p.add_argument("--layers", type=int, default=2, help="Mistral decoder layers in the llm part")
    p.add_argument("--mixtral-layers", type=int, default=1, help="Mixtral decoder layers in the llm part")
    p.add_argument("--image-repeats", type=int, default=2, help="runs of the image part (after a warm-up)")
    p.add_argument("--budget", type=float, default=120.0, help="seconds after which a case stops repeating")
    p.add_argument("--parts", default="llm,image,memory", help="comma-separated subset of llm,image,memory")
    args = p.parse_args()
    parts = args.parts.split(",")
    # The CPU backend's quantized matmul has no fast kernel (~1.4 GFLOP/s, linear in the rows):
    # 4-bit prefill there is measured on a prefix, and reported per token.
    on_cpu = mx.default_device() == mx.cpu
    if args.quick:
        args.repeats, args.image_repeats, args.prompt, args.tokens = 1, 1, 24, 4
    if args.quantized_prompt is None:
        args.quantized_prompt = min(16, args.prompt) if on_cpu else args.prompt
    if args.quantized_positions is None and on_cpu:
        args.quantized_positions = 64
    if "memory" in parts and "image" not in parts:
        parts.append("image")  # the estimate uses the image run's working memory

    settings = ("prompt", "tokens", "memory_tokens", "layers", "mixtral_layers", "repeats", "image_repeats",
                "quantized_prompt", "quantized_positions")  # fmt: skip
    result = {"machine": harness.machine(), "float_dtype": str(float_dtype()), "quick": args.quick,
              "settings": {k: getattr(args, k) for k in settings}}  # fmt: skip
    text = []
    if "llm" in parts:
        result["llm"] = llm_part(args, harness.QUICK_MISTRAL if args.quick else harness.MISTRAL_7B)
        text.append(llm_report(result["llm"], args))
    if "image" in parts:
        result["image"] = image_part(args)
        text.append(image_report(result["image"]))
    if "memory" in parts:
        result["memory"] = memory_part(result["image"], args.memory_tokens, args.quick)
        text.append(memory_report(result["memory"]))
    if args.quick:
        text.append("--quick: tiny model, one run each (a smoke test, not a measurement)")
    harness.emit(result, "\n\n".join(text), args)


if __name__ == "__main__":
    main()
