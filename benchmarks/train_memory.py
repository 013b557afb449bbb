"""Peak memory of one CuMo-7B training step, extrapolated from shallow models at the real widths.

    python benchmarks/train_memory.py [--tokens 128] [--quick] [--json] [--save results.json]

CuMo-Mistral-7B widths (Mistral-7B LLM, CLIP-L/14-336 with 4-expert top-2 MoE MLPs, 4-expert MoE
connector, S2 scales [1, 3]) with only 1-2 LLM layers and 2-3 CLIP layers, random float32 weights.
One sample: one image (576 positions) and `--tokens` text positions, every answer token supervised.
For a LoRA step (rank 64 on every LLM linear) and a full step, each with gradient checkpointing, as
the trainer does them (its loss, AdamW, float32 trainables), it reads `mx.get_peak_memory()` of
one step (Adam state allocated beforehand), each configuration in a fresh process, then extrapolates linearly
per layer to 32 LLM layers and 24 CLIP layers:

    peak(32, 24) = peak(1, 2) + 31 * [peak(2, 2) - peak(1, 2)] + 22 * [peak(1, 3) - peak(1, 2)]

Weights here are float32 (the CPU backend computes in float32); on Metal the frozen weights stay in
their stored bfloat16, so the estimate is also printed with the frozen bytes halved. On the CPU the
MoE layers are not checkpointed (see `trainer.GradCheckpoint`), on Metal they are. --quick runs
the same steps at tiny widths (a smoke test, not a measurement).
"""

from pathlib import Path

import harness

SHAPES = {(1, 2), (2, 2), (1, 3)}
# (LLM widths, CLIP tower): CuMo-Mistral-7B, or tiny for --quick
CUMO_7B = ({**harness.MISTRAL_7B, "vocab_size": 32000}, harness.CLIP_L)
TINY = ({**harness.QUICK_MISTRAL, "vocab_size": 512}, harness.QUICK_CLIP)


def measure(llm_layers: int, clip_layers: int, mode: str, tokens: int, quick: bool) -> dict:
    import cumo_mlx  # noqa: F401
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from cumo_mlx.models.config import ModelArgs
    from cumo_mlx.models.model import Model
    from cumo_mlx.train.data import Encoded, collate
    from cumo_mlx.train.losses import batch_losses
    from cumo_mlx.train.optim import adamw
    from cumo_mlx.train.options import TrainConfig
    from cumo_mlx.train.trainer import GradCheckpoint, configure_trainable
    from mlx.utils import tree_flatten

    llm, clip = TINY if quick else CUMO_7B
    config = {
        "model_type": "llava_mistral", "num_hidden_layers": llm_layers, "rms_norm_eps": 1e-5, "rope_theta": 1e6, **llm,
        "mm_projector_type": "smoe_mlp", "clip_smoe": True, "num_experts": 4, "num_selected": 2,
        "scales": [1, 3], "mm_hidden_size": clip["hidden_size"], "vision_config": {**clip, "num_hidden_layers": clip_layers},
    }
    size, positions = clip["image_size"], (clip["image_size"] // clip["patch_size"]) ** 2
    vocab = llm["vocab_size"]
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    parts = configure_trainable(model, TrainConfig(model="", data="", output="", stage="sft", fine_tune_type=mode,
                                                   lora_rank=64, lora_alpha=16, lora_dropout=0.0, lora_layers=-1).resolved())
    GradCheckpoint(model)
    model.train()
    optimizer = adamw(1e-5)
    rng = np.random.default_rng(0)
    ids = [1] + rng.integers(3, vocab, 20).tolist() + [-200] + rng.integers(3, vocab, tokens - 21).tolist()
    labels = [-100] * 22 + ids[22:]
    pixels = rng.standard_normal((1, size, size, 3)).astype(np.float32)
    batch = collate([Encoded(ids, labels, pixels)], positions, None).as_mx()
    step = nn.value_and_grad(model, lambda m, b: batch_losses(m, b)[0])

    def one_step():
        loss, grads = step(model, batch)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        mx.eval(loss, model.parameters(), optimizer.state)

    optimizer.init(model.trainable_parameters())  # the optimizer state a running training holds
    mx.eval(optimizer.state)
    mx.reset_peak_memory()
    one_step()
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    return {"peak_gb": mx.get_peak_memory() / 1e9, "trainable": trainable, "parameters": total, "parts": parts}


CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from train_memory import measure
print(json.dumps(measure(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), sys.argv[6] == "1")))
"""


def estimate(runs: dict) -> dict:
    """Per-layer growth and the 32-LLM-layer, 24-CLIP-layer extrapolation of one mode's runs."""
    base = runs[(1, 2)]["peak_gb"]
    per_llm = runs[(2, 2)]["peak_gb"] - base
    per_clip = runs[(1, 3)]["peak_gb"] - base
    peak = base + 31 * per_llm + 22 * per_clip
    frozen = {k: (r["parameters"] - r["trainable"]) * 4 / 1e9 for k, r in runs.items()}
    frozen_full = frozen[(1, 2)] + 31 * (frozen[(2, 2)] - frozen[(1, 2)]) + 22 * (frozen[(1, 3)] - frozen[(1, 2)])
    return {
        "runs": {f"{llm}x{clip}": r for (llm, clip), r in runs.items()},
        "per_llm_layer_gb": per_llm,
        "per_clip_layer_gb": per_clip,
        "cumo_7b_peak_gb": peak,
        "cumo_7b_peak_gb_frozen_bf16": peak - frozen_full / 2,
    }


def main():
    p = harness.parser(__doc__.split("\n")[0], repeats=1)
    p.add_argument("--tokens", type=int, default=128, help="Text positions besides the image's.")
    args = p.parse_args()
    tokens = 32 if args.quick else args.tokens
    here = str(Path(__file__).resolve().parent)
    modes = {}
    for mode in ("lora", "full"):
        runs = {
            (llm, clip): harness.run_python(CHILD, here, str(llm), str(clip), mode, str(tokens), str(int(args.quick)))
            for llm, clip in sorted(SHAPES)
        }
        modes[mode] = estimate(runs)
    result = {"machine": harness.machine(), "quick": args.quick, "tokens": tokens, "modes": modes}
    headers = ["mode", "1x2 GB", "2x2 GB", "1x3 GB", "per LLM layer", "per CLIP layer", "CuMo-7B GB", "bf16 frozen GB"]
    rows = [
        [mode, *(m["runs"][k]["peak_gb"] for k in ("1x2", "2x2", "1x3")), m["per_llm_layer_gb"], m["per_clip_layer_gb"],
         m["cumo_7b_peak_gb"], m["cumo_7b_peak_gb_frozen_bf16"]]
        for mode, m in modes.items()
    ]
    text = [f"One training step, {tokens} text positions + one image (LLM x CLIP layers measured):", harness.table(headers, rows)]
    if args.quick:
        text.append("\n--quick: tiny widths (a smoke test, not a measurement)")
    harness.emit(result, "\n".join(text), args)


if __name__ == "__main__":
    main()
