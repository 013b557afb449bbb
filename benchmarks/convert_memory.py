"""Peak memory of `cumo-mlx convert` on a sharded checkpoint, next to one shard + the largest tensor.

    python benchmarks/convert_memory.py [--quick] [--json] [--layers 4] [--clip-layers 4] [--shards 4]

Writes a synthetic CuMo-Mistral checkpoint in the original layout (bfloat16 safetensors, sharded
with an index, random weights): Mistral-7B and CLIP-L widths with --layers LLM layers and
--clip-layers CLIP-MoE layers (4 experts), the MoE connector; then converts it with
`cumo_mlx.convert.convert` to float16 and to 4-bit, each in a fresh process. The figure is the
converting process's peak resident memory above that of a process that imports the same modules
and converts nothing (VmHWM; mapped shard pages count), next to the bound the converter
promises: one shard plus the largest tensor, whatever the size of the model. MLX's own peak
(mx.get_peak_memory) is shown too.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import cumo_mlx
import harness
import numpy as np
import torch
from safetensors.torch import save_file

GB = harness.GB
FULL = {**harness.MISTRAL_7B, "vocab_size": 32000, "clip": harness.CLIP_L}
QUICK = {**harness.QUICK_MISTRAL, "vocab_size": 512, "clip": harness.QUICK_CLIP}
EXPERTS = 4
DEMO_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Runs in a fresh interpreter: the peak RSS of converting (or, with no arguments, of importing only).
# VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's RSS at fork.
CHILD = """
import json, resource, sys
from cumo_mlx.convert.convert import convert
import mlx.core as mx

def peak_rss():
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except OSError:  # macOS: ru_maxrss is in bytes
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

if len(sys.argv) > 1:
    convert(sys.argv[1], sys.argv[2], quantize=sys.argv[3] == "4-bit", dtype="float16", progress=False)
print(json.dumps({"maxrss": peak_rss(), "mlx_peak": mx.get_peak_memory()}))
"""


def original_tensors(dims: dict, layers: int, clip_layers: int) -> dict[str, tuple]:
    """Names and shapes of a CuMo-Mistral checkpoint (CLIP-MoE, MoE connector) in the original layout."""
    h, i, v = dims["hidden_size"], dims["intermediate_size"], dims["vocab_size"]
    kv = dims["num_key_value_heads"] * h // dims["num_attention_heads"]
    clip = dims["clip"]
    d, ci, patch = clip["hidden_size"], clip["intermediate_size"], clip["patch_size"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    llm_layer = {
        "self_attn.q_proj.weight": (h, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, h),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
    }
    for n in range(layers):
        shapes.update({f"model.layers.{n}.{name}": shape for name, shape in llm_layer.items()})
    vm = "model.vision_tower.vision_model."
    shapes.update({
        vm + "embeddings.class_embedding": (d,),
        vm + "embeddings.patch_embedding.weight": (d, 3, patch, patch),
        vm + "embeddings.position_embedding.weight": ((clip["image_size"] // patch) ** 2 + 1, d),
        vm + "pre_layrnorm.weight": (d,),
        vm + "pre_layrnorm.bias": (d,),
    })  # fmt: skip
    clip_layer = {f"self_attn.{proj}.{leaf}": (d, d) if leaf == "weight" else (d,)
                  for proj in ("q_proj", "k_proj", "v_proj", "out_proj") for leaf in ("weight", "bias")}  # fmt: skip
    norms = ("layer_norm1", "layer_norm2")
    clip_layer.update({f"{norm}.{leaf}": (d,) for norm in norms for leaf in ("weight", "bias")})
    clip_layer["gate.weight"] = (EXPERTS, d)
    for e in range(EXPERTS):
        expert = {"fc1.weight": (ci, d), "fc1.bias": (ci,), "fc2.weight": (d, ci), "fc2.bias": (d,)}
        clip_layer.update({f"experts.{e}.{name}": shape for name, shape in expert.items()})
    for n in range(clip_layers):
        shapes.update({f"{vm}encoder.layers.{n}.{name}": shape for name, shape in clip_layer.items()})
    shapes["model.mm_projector.gate.weight"] = (EXPERTS, 2 * d)
    for e in range(EXPERTS):
        expert = {"0.weight": (h, 2 * d), "0.bias": (h,), "2.weight": (h, h), "2.bias": (h,)}
        shapes.update({f"model.mm_projector.experts.{e}.{name}": shape for name, shape in expert.items()})
    return shapes


def original_config(dims: dict, layers: int, clip_layers: int) -> tuple[dict, dict]:
    """The checkpoint's config.json, and the config of its CLIP tower (a directory `clip` beside it)."""
    config = {
        "model_type": "llava_mistral",
        "architectures": ["LlavaMistralForCausalLM"],
        **{k: v for k, v in dims.items() if k != "clip"},
        "num_hidden_layers": layers,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "mm_vision_tower": "clip",
        "mm_hidden_size": dims["clip"]["hidden_size"],
        "mm_projector_type": "smoe_mlp",
        "mlp_smoe": True,
        "clip_smoe": True,
        "num_experts": EXPERTS,
        "num_selected": 2,
        "scales": [1, 3],
    }
    tower = {**dims["clip"], "num_hidden_layers": clip_layers, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
             "model_type": "clip_vision_model"}  # fmt: skip
    return config, tower


def write_checkpoint(directory: Path, dims: dict, layers: int, clip_layers: int, shards: int) -> dict:
    """The checkpoint, its shards of about equal size in name order; returns sizes in bytes."""
    shapes = original_tensors(dims, layers, clip_layers)
    sizes = {name: 2 * int(np.prod(shape)) for name, shape in shapes.items()}
    total = sum(sizes.values())
    files = [f"model-{n + 1:05d}-of-{shards:05d}.safetensors" for n in range(shards)]
    weight_map, filled = {}, 0
    for name in shapes:  # fill the shards in order, each to about total / shards
        weight_map[name] = files[min(filled * shards // total, shards - 1)]
        filled += sizes[name]
    generator = torch.Generator().manual_seed(0)
    for file in files:
        names = [n for n in shapes if weight_map[n] == file]
        part = {n: torch.randn(shapes[n], generator=generator).mul_(0.02).to(torch.bfloat16) for n in names}
        save_file(part, str(directory / file), metadata={"format": "pt"})
        del part
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    config, tower = original_config(dims, layers, clip_layers)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "clip").mkdir()
    (directory / "clip" / "config.json").write_text(json.dumps(tower, indent=2))
    for name in DEMO_TOKENIZER:  # any tokenizer does: the shipped demo's
        shutil.copyfile(Path(cumo_mlx.__file__).parent / "demo" / name, directory / name)
    largest_shard = max(os.path.getsize(directory / f) for f in files)
    return {"total": total, "largest_shard": largest_shard, "largest_tensor": max(sizes.values()), "shards": shards}


def main():
    p = harness.parser(__doc__.split("\n")[0], repeats=1)
    p.add_argument("--layers", type=int, default=4, help="LLM layers of the synthetic checkpoint")
    p.add_argument("--clip-layers", type=int, default=4, help="CLIP-MoE layers")
    p.add_argument("--shards", type=int, default=4)
    args = p.parse_args()
    if args.quick:
        dims, layers, clip_layers, shards = QUICK, 2, 2, 3
    else:
        dims, layers, clip_layers, shards = FULL, args.layers, args.clip_layers, args.shards
    repeats = max(args.repeats, 1)

    with tempfile.TemporaryDirectory(prefix="cumo-convert-memory-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        sizes = write_checkpoint(src, dims, layers, clip_layers, shards)
        bound = sizes["largest_shard"] + sizes["largest_tensor"]
        baseline = min(harness.run_python(CHILD)["maxrss"] for _ in range(repeats))
        conversions = {}
        for precision in ("float16", "4-bit"):
            runs = [harness.run_python(CHILD, str(src), str(Path(tmp) / f"{precision}-{n}"), precision) for n in range(repeats)]
            peak = min(r["maxrss"] for r in runs) - baseline
            conversions[precision] = {
                "peak_rss_above_baseline": peak,
                "mlx_peak": min(r["mlx_peak"] for r in runs),
                "peak_over_bound": peak / bound,
                "peak_over_checkpoint": peak / sizes["total"],
            }

    result = {"machine": harness.machine(), "quick": args.quick, "layers": layers, "clip_layers": clip_layers,
              "checkpoint": sizes, "bound": bound, "baseline_rss": baseline, "conversions": conversions}  # fmt: skip
    rows = [[name, c["peak_rss_above_baseline"] / GB, c["mlx_peak"] / GB, c["peak_over_bound"],
             c["peak_over_checkpoint"]] for name, c in conversions.items()]  # fmt: skip
    headers = ["converted to", "peak RSS GB (above imports)", "MLX peak GB", "peak / bound", "peak / checkpoint"]
    text = [
        f"Synthetic bfloat16 checkpoint: {layers} LLM layers, {clip_layers} CLIP-MoE layers, "
        f"{sizes['total'] / GB:.2f} GB in {shards} shards (largest {sizes['largest_shard'] / GB:.2f} GB), "
        f"largest tensor {sizes['largest_tensor'] / GB:.2f} GB; "
        f"bound = largest shard + largest tensor = {bound / GB:.2f} GB",
        harness.table(headers, rows),
    ]
    if args.quick:
        text.append("\n--quick: tiny checkpoint (a smoke test, not a measurement)")
    harness.emit(result, "\n".join(text), args)


if __name__ == "__main__":
    main()
