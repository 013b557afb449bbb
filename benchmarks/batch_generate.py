"""Batched generation: tokens/s by batch size against single runs and mlx-lm, and the vision cache's
time to first token.

    python benchmarks/batch_generate.py [--quick] [--json] [--repeats 1] [--batches 1,2,4,8,16]
        [--tokens 8] [--prompt 16] [--quantized-batches 1,2,4,8] [--quantized-tokens 4]
        [--quantized-prompt 4] [--vision-layers 24] [--parts throughput,ttft]

throughput  Generated tokens/s of greedy answers to B text prompts (B = --batches) on (a) the demo
            (its questions), (b) Mistral-7B widths with 2 layers, float32 and 4-bit (quantized as
            `cumo-mlx convert -q` does), (c) Mixtral-8x7B widths with 1 layer, float32 (random
            weights and prompt ids of --prompt tokens). Three ways, timed in interleaved rounds: ours
            (`cumo_mlx.batch_generate`, B at once), single runs one after another
            (`cumo_mlx.generate`; its tokens/s does not depend on B, so 2 runs measure it), and
            mlx-lm's `batch_generate` driving the very same language model module (same weights).
            Figures: generated tokens over the whole call ("tok/s", prefill included) and over the
            call less its prompt processing ("decode tok/s", mlx-lm's own definition). MLX's CPU
            quantized matmul costs the same per row whatever the batch (no fast kernel, ~7 GFLOP/s):
            4-bit runs take --quantized-batches, --quantized-tokens and --quantized-prompt there.
ttft        Time to the first token of an image question at CuMo-7B's vision widths (CLIP-L/14-336,
            CLIP-MoE and MoE connector, S2 [1, 3]: 10 crops; --vision-layers layers, the last unused
            as in CuMo) with a Mistral-7B-width LLM of 2 layers, float32, through `BatchEngine`:
            an image first seen; seen before (a vision cache hit); seen before in a conversation
            prefix the prompt cache holds (a new question after the same system text and image).
"""

import gc
import time

import harness
import mlx.core as mx
import numpy as np
from cumo_mlx.batch import BatchEngine, VisionCache, batch_generate
from cumo_mlx.convert.convert import quantization_plan
from cumo_mlx.generate import stream_generate
from cumo_mlx.loader import load
from cumo_mlx.models.config import ModelArgs
from cumo_mlx.models.model import Model
from cumo_mlx.processor import Processor
from cumo_mlx.prompt import IMAGE_TOKEN_INDEX, chat_prompt
from mlx_lm.generate import batch_generate as mlx_lm_batch_generate
from mlx_lm.tokenizer_utils import TokenizerWrapper
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

COMMON = {"rms_norm_eps": 1e-5, "rope_theta": 1e6, "tie_word_embeddings": False}
MIXTRAL = {"num_local_experts": 8, "num_experts_per_tok": 2}
DEMO_QUESTIONS = ["What shape is this?", "What colour is the circle?", "How many shapes are there?",
                  "Is there a red circle?", "Describe the image in detail.", "What color is it?"]  # fmt: skip
TEXT_BEFORE, TEXT_AFTER = 48, 16  # prompt ids around the image in the ttft part (system text, question)


def synthetic_processor(args: ModelArgs) -> Processor:
    """A Processor whose tokenizer has one word per id of the model's vocabulary (`<s>` 1, `</s>` 2):
    random-weight models at real widths generate any id, and every id decodes."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, args.text_config.vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return Processor(TokenizerWrapper(fast), args)


def build_model(llm: dict, layers: int, vision: dict, vocab_size: int) -> Model:
    """A CuMo with random weights: LLM widths `llm` with `layers` layers, vision config `vision`."""
    moe = "num_local_experts" in llm
    config = {"model_type": f"llava_{'mixtral' if moe else 'mistral'}", **llm, **COMMON, "vocab_size": vocab_size,
              "num_hidden_layers": layers, "scales": [1, 3], "mm_projector_type": "smoe_mlp", "clip_smoe": True,
              "num_experts": 4, "num_selected": 2, "vision_config": vision,
              "mm_hidden_size": vision.get("hidden_size", 1024)}  # fmt: skip
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    return model


def random_prompts(count: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[1, *rng.integers(3, vocab_size, length - 1).tolist()] for _ in range(count)]


# ------------------------------------------------------------------------------------------------
# throughput
# ------------------------------------------------------------------------------------------------


def throughput_cases(model: Model, processor: Processor, prompts: list, tokens: int, batches: list[int]):
    """The timed cases of one model, and the answers each gave (to compare them afterwards)."""
    answers = {}

    def ours(batch):
        tic = time.perf_counter()
        result = batch_generate(model, processor, prompts[:batch], max_tokens=tokens, temp=0.0, max_batch_size=batch)
        wall = time.perf_counter() - tic
        answers[f"ours {batch}"] = result.tokens
        stats = result.stats
        decode = wall - stats.prompt_time - stats.image_time
        return {"tps": stats.generation_tokens / wall, "decode_tps": stats.generation_tokens / decode}

    def mlx_lm(batch):
        tic = time.perf_counter()
        result = mlx_lm_batch_generate(model.language_model, processor.tokenizer, prompts[:batch], max_tokens=tokens,
                                       return_token_ids=True)  # fmt: skip
        wall = time.perf_counter() - tic
        answers[f"mlx-lm {batch}"] = result.token_ids
        return {"tps": result.stats.generation_tokens / wall, "decode_tps": result.stats.generation_tps}

    def single_runs():
        tic, generated, answer = time.perf_counter(), 0, []
        for prompt in prompts[:2]:
            responses = list(stream_generate(model, processor, prompt, max_tokens=tokens, temp=0.0))
            generated += len(responses)
            answer.append([r.token for r in responses if r.finish_reason != "stop"])
        answers["single"] = answer
        wall = time.perf_counter() - tic
        return {"tps": generated / wall, "decode_tps": generated / wall}

    cases = {"single runs": single_runs}
    for batch in batches:
        cases[f"ours {batch}"] = lambda b=batch: ours(b)
        cases[f"mlx-lm {batch}"] = lambda b=batch: mlx_lm(b)
    return cases, answers


def measure_throughput(model, processor, prompts, args, quantized: bool = False, min_seconds: float = 0.0) -> dict:
    batches = args.quantized_batches if quantized else args.batches
    tokens = args.quantized_tokens if quantized else args.tokens
    cases, answers = throughput_cases(model, processor, prompts, tokens, batches)
    figures = harness.run_cases(cases, args.repeats, args.budget, min_seconds)
    largest = max(batches)
    figures.update(prompt_tokens=len(prompts[0]), tokens=tokens, batches=batches)
    # Greedy answers: ours in the largest batch against single runs, and against mlx-lm's.
    figures["matches_single"] = answers[f"ours {largest}"][:2] == answers["single"]
    figures["matches_mlx_lm"] = answers[f"ours {largest}"] == answers[f"mlx-lm {largest}"]
    return figures


def throughput_part(args) -> dict:
    results = {}
    model, processor = load("demo")
    questions = (DEMO_QUESTIONS * 3)[: max(args.batches)]
    prompts = [processor.tokenize(chat_prompt([q])) for q in questions]
    # The demo's runs take milliseconds: rounds for 20 s give a stable median.
    results["demo"] = measure_throughput(model, processor, prompts, args, min_seconds=0 if args.quick else 20)
    del model
    llm = harness.QUICK_MISTRAL if args.quick else harness.MISTRAL_7B
    vocab = 1000 if args.quick else 32000
    for name, widths, layers in (("mistral 2L", llm, 2), ("mixtral 1L", {**llm, **MIXTRAL}, 1)):
        gc.collect()
        mx.clear_cache()
        model = build_model(widths, layers, harness.QUICK_CLIP | {"num_hidden_layers": 2, "shortest_edge": 56,
                            "crop_size": 56}, vocab)  # fmt: skip
        processor = synthetic_processor(model.args)
        prompts = random_prompts(max(args.batches), args.prompt, vocab)
        results[f"{name} float32"] = measure_throughput(model, processor, prompts, args)
        if name.startswith("mistral"):
            quantization_plan(model, 4, 64, vision_bits=None)
            prompts = random_prompts(max(args.quantized_batches), args.quantized_prompt, vocab)
            results[f"{name} 4-bit"] = measure_throughput(model, processor, prompts, args, quantized=True)
        del model
    return results


# ------------------------------------------------------------------------------------------------
# ttft
# ------------------------------------------------------------------------------------------------


def first_token(engine: BatchEngine, ids: list[int], image) -> dict:
    """Seconds from submitting an image question to its first token (the engine driven here), and
    the seconds of it spent on the image (reading, preprocessing, vision tower and connector)."""
    image_time = engine.stats.image_time
    tic = time.perf_counter()
    stream = engine.submit(ids, image, temp=0.0, max_tokens=1)
    while engine.step():
        pass
    assert stream.get().finish_reason == "length"
    return {"seconds": time.perf_counter() - tic, "image_seconds": engine.stats.image_time - image_time}


def ttft_part(args) -> dict:
    llm = harness.QUICK_MISTRAL if args.quick else harness.MISTRAL_7B
    vision = {"num_hidden_layers": args.vision_layers}
    if args.quick:
        vision |= harness.QUICK_CLIP | {"shortest_edge": 56, "crop_size": 56}
    model = build_model(llm, 2, vision, 1000 if args.quick else 32000)
    processor = synthetic_processor(model.args)
    rng = np.random.default_rng(1)
    vocab = model.args.text_config.vocab_size
    before = [1, *rng.integers(3, vocab, TEXT_BEFORE).tolist(), IMAGE_TOKEN_INDEX]
    questions = iter(rng.integers(3, vocab, (1000, TEXT_AFTER)).tolist())  # a new question each run
    size = model.args.vision_config.image_size
    seen = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    warm = VisionCache()
    kept = BatchEngine(model, processor, vision_cache=warm)  # its prompt cache keeps the conversations
    first_token(kept, before + next(questions), seen)

    def first_seen():
        image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        engine = BatchEngine(model, processor, vision_cache=VisionCache(), prompt_cache_bytes=0)
        return first_token(engine, before + next(questions), image)

    def vision_hit():
        engine = BatchEngine(model, processor, vision_cache=warm, prompt_cache_bytes=0)
        return first_token(engine, before + next(questions), seen)

    def vision_and_prompt_hit():
        return first_token(kept, before + next(questions), seen)

    cases = {"first seen": first_seen, "seen (vision cache)": vision_hit,
             "seen (vision + prompt cache)": vision_and_prompt_hit}  # fmt: skip
    figures = harness.run_cases(cases, args.repeats, args.budget)
    miss = figures["first seen"]["seconds"]
    for name in cases:
        figures[name]["speedup"] = miss / figures[name]["seconds"]
    figures["positions"] = len(before) + TEXT_AFTER + model.args.image_tokens - 1
    figures["vision_layers_run"] = args.vision_layers - 1
    return figures


# ------------------------------------------------------------------------------------------------


def throughput_report(results: dict, args) -> str:
    rows = []
    for model_name, figures in results.items():
        single = figures["single runs"]["tps"]
        for batch in figures["batches"]:
            ours, theirs = figures[f"ours {batch}"], figures[f"mlx-lm {batch}"]
            label = f"{model_name} ({figures['prompt_tokens']}+{figures['tokens']})"
            rows.append([label if batch == figures["batches"][0] else "", batch, ours["tps"], ours["decode_tps"],
                         theirs["tps"], theirs["decode_tps"], single, ours["tps"] / single,
                         ours["decode_tps"] / theirs["decode_tps"]])  # fmt: skip
        rows.append(["", "answers", f"= single: {figures['matches_single']}", f"= mlx-lm: {figures['matches_mlx_lm']}",
                     "", "", "", "", ""])  # fmt: skip
    headers = ["model", "batch", "ours tok/s", "ours decode", "mlx-lm tok/s", "mlx-lm decode", "single runs tok/s",
               "ours / single", "decode ours / mlx-lm"]  # fmt: skip
    title = "Generated tokens/s, greedy (model (prompt tokens + tokens generated per prompt); the demo: its questions)"
    return title + "\n" + harness.table(headers, rows)


def ttft_report(figures: dict) -> str:
    cases = ("first seen", "seen (vision cache)", "seen (vision + prompt cache)")
    rows = [[name, *(figures[name][k] for k in ("seconds", "image_seconds", "speedup", "runs"))] for name in cases]
    title = (f"Time to first token of an image question ({figures['positions']} positions) at CuMo-7B vision "
             f"widths ({figures['vision_layers_run']} CLIP layers run), Mistral-7B widths 2 layers")  # fmt: skip
    return title + "\n" + harness.table(["image", "seconds", "of it image s", "speedup", "runs"], rows)


def targets(result: dict) -> dict:
    """The issue's targets: batch 8 over batch 1 (4-bit Mistral-7B widths), ours over mlx-lm, the
    vision cache's cut of the time to first token."""
    found = {}
    for name, figures in result.get("throughput", {}).items():
        if "ours 8" in figures:
            ours, one, theirs = figures["ours 8"], figures["ours 1"], figures["mlx-lm 8"]
            found[f"{name}: decode tok/s batch 8 / batch 1"] = ours["decode_tps"] / one["decode_tps"]
            found[f"{name}: tok/s ours / mlx-lm, batch 8"] = ours["tps"] / theirs["tps"]
    if "ttft" in result:
        for case in ("seen (vision cache)", "seen (vision + prompt cache)"):
            found[f"time to first token, first seen / {case}"] = result["ttft"][case]["speedup"]
    return found


def main():
    p = harness.parser(__doc__.split("\n")[0], repeats=1)
    p.add_argument("--batches", default="1,2,4,8,16", help="comma-separated batch sizes")
    p.add_argument("--tokens", type=int, default=8, help="tokens generated per prompt")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens (random ids) of the float models")
    p.add_argument("--quantized-batches", default="1,2,4,8", help="batch sizes of the 4-bit model")
    p.add_argument("--quantized-tokens", type=int, default=4, help="tokens generated per prompt, 4-bit")
    p.add_argument("--quantized-prompt", type=int, default=4, help="prompt tokens of the 4-bit model")
    p.add_argument("--vision-layers", type=int, default=24, help="CLIP layers of the ttft model (one fewer run)")
    p.add_argument("--budget", type=float, default=6.0, help="seconds after which a case stops repeating")
    p.add_argument("--parts", default="throughput,ttft", help="comma-separated subset of throughput,ttft")
    args = p.parse_args()
    if args.quick:
        args.batches = args.quantized_batches = "1,2"
        args.tokens, args.prompt, args.quantized_tokens, args.quantized_prompt, args.repeats = 4, 12, 4, 6, 1
        args.vision_layers = 2
    args.batches = [int(b) for b in args.batches.split(",")]
    args.quantized_batches = [int(b) for b in args.quantized_batches.split(",")]
    parts = args.parts.split(",")
    settings = ("batches", "tokens", "prompt", "quantized_batches", "quantized_tokens", "quantized_prompt",
                "vision_layers", "repeats", "budget")  # fmt: skip
    result = {"machine": harness.machine(), "quick": args.quick, "settings": {k: getattr(args, k) for k in settings}}
    text = []
    if "throughput" in parts:
        result["throughput"] = throughput_part(args)
        text.append(throughput_report(result["throughput"], args))
    if "ttft" in parts:
        result["ttft"] = ttft_part(args)
        text.append(ttft_report(result["ttft"]))
    result["targets"] = targets(result)
    text.append("Targets:\n" + "\n".join(f"  {name}: {value:.2f}" for name, value in result["targets"].items()))
    if args.quick:
        text.append("--quick: tiny models, one run each (a smoke test, not a measurement)")
    harness.emit(result, "\n\n".join(text), args)


if __name__ == "__main__":
    main()
