"""The vision side's bits (`cumo-mlx convert -q --vision-bits`): memory saved against the change of
the model's outputs.

    python benchmarks/quantize_vision.py [--quick] [--json] [--seeds 4] [--tokens 16] [--questions 200]

memory  The bytes of CuMo-Mistral-7B's vision tower + connector stored float16, 8-bit and 4-bit
        (group 64), and of the whole model with a 4-bit LLM (exact, counted on a lazy model as the
        converter quantizes it: nothing allocated).
random  --seeds tiny random CuMo models (CLIP-MoE, MoE connector; a Mistral LLM, and a Mixtral one),
        their vision side stored float16 (the reference), then quantized to 8 and 4 bits (group
        64); everything else equal and computed in float32. On one image prompt: the max and
        mean |logit - reference logit| over every position, over the mean |reference logit|;
        the share of positions whose top token agrees; and the share of --tokens greedy tokens
        equal to the reference's, position by position.
demo    The shipped demo (trained weights; group 32, its widths are multiples of 32 only): its
        greedy answers to the first --questions held-out shapes questions with the vision side
        float16 and quantized: the share of answers equal to float16's, and each one's accuracy.
"""

import json
import tempfile
from pathlib import Path

import harness
import mlx.core as mx
import numpy as np
from cumo_mlx.convert.convert import VISION_BITS, quantization_plan
from cumo_mlx.eval.shapes import is_correct
from cumo_mlx.generate import generate
from cumo_mlx.loader import DEMO_PATH, load
from cumo_mlx.models.config import ModelArgs
from cumo_mlx.models.model import Model
from cumo_mlx.prompt import IMAGE_TOKEN_INDEX
from cumo_mlx.shapes import write_dataset
from generate import LLM_LAYERS, full_model_weight_bytes
from mlx_lm.generate import generate_step

BITS = (VISION_BITS, 4)
GROUP = 64
MIXTRAL_EXPERTS = {"num_local_experts": 4, "num_experts_per_tok": 2}


def quantize_vision(model: Model, bits: int, group_size: int) -> None:
    """The vision tower and connector quantized as the converter does; the LLM left as it is."""
    quantization_plan(model, None, group_size, bits)


def tiny_model(seed: int, mixtral: bool) -> Model:
    """A random CuMo at the other benchmarks' --quick widths (S2 [1, 2]), float16 weights run in float32."""
    llm = {**harness.QUICK_MISTRAL, **(MIXTRAL_EXPERTS if mixtral else {})}
    vision = {**harness.QUICK_CLIP, "num_hidden_layers": 4, "shortest_edge": 56, "crop_size": 56}
    config = {"model_type": "llava_mixtral" if mixtral else "llava_mistral", **llm, "num_hidden_layers": 2, "vocab_size": 512, "scales": [1, 2],
              "mm_projector_type": "smoe_mlp", "clip_smoe": True, "num_experts": 4, "num_selected": 2,
              "vision_config": vision, "mm_hidden_size": vision["hidden_size"]}  # fmt: skip
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    model.set_dtype(mx.float16)  # as stored by the converter
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model


def image_prompt(model: Model, seed: int) -> tuple[list[int], mx.array]:
    size = model.args.vision_config.image_size
    pixels = mx.random.normal((1, size, size, 3), key=mx.random.key(seed))
    text = np.random.default_rng(seed).integers(3, model.args.text_config.vocab_size, 24).tolist()
    return [1, *text[:8], IMAGE_TOKEN_INDEX, *text[8:]], pixels


def outputs(model: Model, ids: list[int], pixels: mx.array, tokens: int) -> tuple[np.ndarray, list[int]]:
    """The logits at every position of the prompt, and `tokens` greedy tokens after it."""
    embeddings = model.embed_inputs(ids, model.encode_images(pixels).features)
    logits = model.language_model(mx.zeros((1, embeddings.shape[0]), mx.int32), input_embeddings=embeddings[None])
    steps = generate_step(mx.zeros(embeddings.shape[0], mx.int32), model.language_model, max_tokens=tokens,
                          input_embeddings=embeddings, sampler=lambda x: mx.argmax(x, axis=-1))  # fmt: skip
    return np.array(logits[0].astype(mx.float32)), [int(token) for token, _ in steps]


def compare(reference: tuple, other: tuple) -> dict:
    (ref_logits, ref_tokens), (logits, tokens) = reference, other
    diff = np.abs(logits - ref_logits)
    scale = np.abs(ref_logits).mean()
    return {
        "max_logit_error": float(diff.max() / scale),
        "mean_logit_error": float(diff.mean() / scale),
        "top_token_agreement": float((logits.argmax(-1) == ref_logits.argmax(-1)).mean()),
        "greedy_token_agreement": float(np.mean([a == b for a, b in zip(tokens, ref_tokens)])),
    }


def random_part(args) -> dict:
    results = {}
    for llm, mixtral in (("mistral", False), ("mixtral", True)):
        runs = {bits: [] for bits in BITS}
        for seed in range(args.seeds):
            model = tiny_model(seed, mixtral)
            ids, pixels = image_prompt(model, seed)
            reference = outputs(model, ids, pixels, args.tokens)
            for bits in BITS:
                model = tiny_model(seed, mixtral)
                quantize_vision(model, bits, GROUP)
                runs[bits].append(compare(reference, outputs(model, ids, pixels, args.tokens)))
        results[llm] = {bits: {k: float(np.mean([r[k] for r in rs])) for k in rs[0]} for bits, rs in runs.items()}
    return results


def demo_answers(bits, questions: list[dict], folder: Path) -> list[str]:
    model, processor = load(DEMO_PATH)
    if bits:
        quantize_vision(model, bits, 32)
    return [generate(model, processor, q["question"], folder / q["image"], temp=0.0, max_tokens=8).strip() for q in questions]


def demo_part(args) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        write_dataset(Path(folder), max(2, args.questions), seed=1, progress=False)  # the recipe's held-out seed
        questions = json.loads((Path(folder) / "questions.json").read_text())[: args.questions]
        answers = {bits: demo_answers(bits, questions, Path(folder)) for bits in (None, *BITS)}
    result = {"questions": len(questions)}
    for bits, given in answers.items():
        result["float16" if bits is None else f"{bits}-bit"] = {
            "accuracy": float(np.mean([is_correct(a, q["answer"]) for a, q in zip(given, questions)])),
            "same_answer_as_float16": float(np.mean([a == b for a, b in zip(given, answers[None])])),
        }
    return result


def memory_part(quick: bool) -> dict:
    sizes = {}
    for bits in (None, *BITS):
        weights = full_model_weight_bytes(quick, bits)
        vision = weights["vision_tower"] + weights["connector"]
        sizes["float16" if bits is None else f"{bits}-bit"] = {"vision_side_bytes": vision,
                                                               "whole_model_bytes": sum(weights.values())}  # fmt: skip
    return sizes


def report(result: dict) -> str:
    gb = harness.GB
    rows = [[name, m["vision_side_bytes"] / gb, m["whole_model_bytes"] / gb] for name, m in result["memory"].items()]
    text = [f"CuMo-Mistral-7B ({LLM_LAYERS} layers, LLM 4-bit), weights in GB:",
            harness.table(["vision side", "vision tower + connector", "whole model"], rows)]  # fmt: skip
    rows = [[llm, f"{bits}-bit", *figures.values()] for llm, by_bits in result["random"].items()
            for bits, figures in by_bits.items()]  # fmt: skip
    text += ["", f"Tiny random models (mean of {result['seeds']}), against the float16 vision side:",
             harness.table(["LLM", "vision side", "max |logit err| / mean |logit|", "mean |logit err| / mean |logit|",
                            "top token agrees", "greedy tokens agree"], rows)]  # fmt: skip
    demo = result["demo"]
    rows = [[name, f["accuracy"], f["same_answer_as_float16"]] for name, f in demo.items() if name != "questions"]
    text += ["", f"The demo on {demo['questions']} held-out questions:",
             harness.table(["vision side", "accuracy", "same answer as float16"], rows)]  # fmt: skip
    return "\n".join(text)


def main():
    p = harness.parser(__doc__.split("\n")[0], repeats=1)
    p.add_argument("--seeds", type=int, default=4, help="random tiny models per LLM kind")
    p.add_argument("--tokens", type=int, default=16, help="greedy tokens compared per model")
    p.add_argument("--questions", type=int, default=200, help="held-out demo questions")
    args = p.parse_args()
    if args.quick:
        args.seeds, args.tokens, args.questions = 1, 4, 4
    result = {"machine": harness.machine(), "quick": args.quick, "seeds": args.seeds, "tokens": args.tokens,
              "memory": memory_part(args.quick), "random": random_part(args), "demo": demo_part(args)}  # fmt: skip
    harness.emit(result, report(result), args)


if __name__ == "__main__":
    main()
