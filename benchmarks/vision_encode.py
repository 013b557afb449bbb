"""One image through CuMo-7B's vision tower, ours (MLX) next to transformers' CLIPVisionModel (torch).

    python benchmarks/vision_encode.py [--quick] [--json] [--repeats 3] [--layers 24]

The image goes through S2 multi-scale, scales [1, 3]: the 336 image and the 9 crops of its 1008
bicubic resize, 10 crops of 577 tokens, one batch. Random weights, CLIP-L/14-336 dimensions:

  ours MoE     our vision tower with CuMo's CLIP-MoE (4 experts, top-2 in every layer): S2 resize,
               crops, the tower (the last layer is not run: its output is not used), stitching
  ours dense   the same with dense MLPs (CLIP-L as LLaVA has it)
  torch dense  transformers' CLIPVisionModel on the same 10 crops (torch's bicubic resize first),
               hidden_states[-2] as the original takes it (all layers run), torch threads = cores,
               in a separate process: in one that has loaded cumo_mlx's OpenBLAS torch runs ~6x slower

Top-2 MoE MLPs do twice the MLP work of dense ones (the MLPs are 2/3 of a CLIP layer's matmul
work), so "ours MoE / torch dense" is not a like-for-like ratio: "ours dense / torch dense" is the
framework comparison and "ours MoE / ours dense" the cost of the experts. float32 on the CPU backend
(float16 on a GPU; torch always runs on the CPU). --layers reduces the depth of all three alike.

Against the machine: each of our towers' matmul work (GFLOP, counted from the widths: projections,
attention scores, MLPs or the two chosen experts and the router, the patch embedding) over its time
gives its GFLOP/s, set against a same-run matmul of CLIP-L's MLP shape (10 x 577 tokens x 1024 x 4096;
sgemm on the CPU) in the tower's dtype: the ratio is the fraction of the machine's matmul rate reached.
"""

import json
import subprocess
import sys

import harness
import mlx.core as mx
import numpy as np
from cumo_mlx.models.config import ModelArgs
from cumo_mlx.models.vision import VisionTower

SCALES = [1, 3]
EXPERTS, TOP_K = 4, 2  # CuMo's CLIP-MoE
# torch runs in its own process: one that has loaded cumo_mlx's OpenBLAS (RTLD_GLOBAL) runs torch's
# matmuls through it, ~6x slower here. It times one image per line read, on the same pixels.
TORCH_WORKER = """
import json, os, sys, time
import numpy as np, torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel

dims, layers = json.loads(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(os.cpu_count())
config = CLIPVisionConfig(**dims, num_hidden_layers=layers, hidden_act="quick_gelu", layer_norm_eps=1e-5)
model = CLIPVisionModel(config).eval()
size = dims["image_size"]
pixels = np.random.default_rng(0).standard_normal((1, size, size, 3)).astype(np.float32)
image = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()

@torch.inference_mode()
def features():
    big = F.interpolate(image, scale_factor=3, mode="bicubic", align_corners=False)  # the 9 crops, row-major
    crops = [big[..., i * size : (i + 1) * size, j * size : (j + 1) * size] for i in range(3) for j in range(3)]
    return model(pixel_values=torch.cat([image, *crops]), output_hidden_states=True).hidden_states[-2]

print(json.dumps({"threads": torch.get_num_threads()}), flush=True)
for _ in sys.stdin:
    tic = time.perf_counter()
    features()
    print(time.perf_counter() - tic, flush=True)
"""


def our_tower(dims: dict, layers: int, moe: bool, dtype: mx.Dtype) -> VisionTower:
    vision = {**dims, "num_hidden_layers": layers, "hidden_act": "quick_gelu", "shortest_edge": dims["image_size"],
              "crop_size": dims["image_size"]}  # fmt: skip
    config = {"model_type": "llava_mistral", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 1,
              "num_attention_heads": 4, "vision_config": vision, "mm_hidden_size": dims["hidden_size"],
              "clip_smoe": moe, "num_experts": EXPERTS, "num_selected": TOP_K, "scales": SCALES}  # fmt: skip
    tower = VisionTower(ModelArgs.from_dict(config))
    tower.set_dtype(dtype)
    mx.eval(tower.parameters())
    return tower


class TorchWorker:
    """transformers' CLIPVisionModel in a child process; `seconds()` times one image there."""

    def __init__(self, dims: dict, layers: int):
        command = [sys.executable, "-c", TORCH_WORKER, json.dumps(dims), str(layers)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.threads = json.loads(self.process.stdout.readline())["threads"]

    def seconds(self) -> float:
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return float(self.process.stdout.readline())

    def close(self):
        self.process.stdin.close()
        self.process.wait()


def tower_gflop(dims: dict, layers: int, moe: bool, crops: int) -> float:
    """Matmul work of one image through our tower (the last layer is not run)."""
    d, inner, patch = dims["hidden_size"], dims["intermediate_size"], dims["patch_size"]
    seq = (dims["image_size"] // patch) ** 2 + 1
    tokens = crops * seq
    attention = 8 * tokens * d * d + 4 * crops * seq * seq * d
    mlp = 4 * tokens * d * inner * TOP_K + 2 * tokens * d * EXPERTS if moe else 4 * tokens * d * inner
    embed = 2 * crops * (seq - 1) * 3 * patch * patch * d
    return ((layers - 1) * (attention + mlp) + embed) / 1e9


def main():
    p = harness.parser(__doc__.split("\n")[0], repeats=3)
    p.add_argument("--layers", type=int, default=24, help="CLIP layers (24 in CLIP-L)")
    args = p.parse_args()
    dims = harness.QUICK_CLIP if args.quick else harness.CLIP_L
    layers = 3 if args.quick else args.layers
    repeats = 1 if args.quick else args.repeats
    dtype = mx.float32 if mx.default_device() == mx.cpu else mx.float16

    size = dims["image_size"]
    pixels = np.random.default_rng(0).standard_normal((1, size, size, 3)).astype(np.float32)
    image = mx.array(pixels).astype(dtype)
    crops = 1 + 9
    tokens = crops * ((size // dims["patch_size"]) ** 2 + 1)
    a = mx.random.normal((tokens, dims["hidden_size"])).astype(dtype)
    b = mx.random.normal((dims["hidden_size"], dims["intermediate_size"])).astype(dtype)
    mx.eval(a, b)
    towers = {"ours MoE": our_tower(dims, layers, True, dtype), "ours dense": our_tower(dims, layers, False, dtype)}
    torch_worker = TorchWorker(dims, layers)
    cases = {name: lambda t=tower: {"seconds": harness.seconds(lambda: t(image)[0])} for name, tower in towers.items()}
    cases["torch dense"] = lambda: {"seconds": torch_worker.seconds()}
    cases["matmul"] = lambda: {"seconds": harness.seconds(lambda: a @ b)}
    timings = harness.run_cases(cases, repeats)
    torch_worker.close()
    matmul = timings.pop("matmul")  # timed in the same rounds, reported with the machine limit

    seconds = {name: t["seconds"] for name, t in timings.items()}
    matmul_rate = 2 * tokens * dims["hidden_size"] * dims["intermediate_size"] / 1e9 / matmul["seconds"]
    gflop = {name: tower_gflop(dims, layers, name == "ours MoE", crops) for name in towers}
    rates = {name: gflop[name] / seconds[name] for name in towers}
    machine_limit = {
        "matmul_seconds": matmul["seconds"],
        "matmul_gflops": matmul_rate,
        **{f"{name} GFLOP": gflop[name] for name in towers},
        **{f"{name} GFLOP/s": rates[name] for name in towers},
        **{f"{name} / matmul rate": rates[name] / matmul_rate for name in towers},
    }
    ratios = {
        "ours MoE / torch dense": seconds["ours MoE"] / seconds["torch dense"],
        "ours dense / torch dense": seconds["ours dense"] / seconds["torch dense"],
        "ours MoE / ours dense": seconds["ours MoE"] / seconds["ours dense"],
    }
    result = {
        "machine": harness.machine(),
        "dtype": str(dtype),
        "torch_threads": torch_worker.threads,
        "layers": layers,
        "crops": crops,
        "quick": args.quick,
        "timings": timings,
        "ratios": ratios,
        "machine_limit": machine_limit,
    }
    rows = [[name, t["seconds"], t["runs"]] for name, t in timings.items()]
    text = [
        f"One image, S2 [1, 3] (10 crops of {size}), {layers} CLIP layers of width {dims['hidden_size']}, "
        f"MLX {dtype}, torch float32 with {torch_worker.threads} threads (in its own process)",
        harness.table(["tower", "seconds", "runs"], rows),
        "",
        harness.table(["ratio", "value"], [[k, v] for k, v in ratios.items()]),
        "",
        f"Against the machine: {dtype} matmul {tokens} x {dims['hidden_size']} x {dims['intermediate_size']} "
        f"in the same run: {matmul_rate:.1f} GFLOP/s",
        harness.table(
            ["tower", "GFLOP", "GFLOP/s", "/ matmul rate"],
            [[name, gflop[name], rates[name], rates[name] / matmul_rate] for name in towers],
        ),
    ]
    if args.quick:
        text.append("\n--quick: tiny tower, one run each (a smoke test, not a measurement)")
    harness.emit(result, "\n".join(text), args)


if __name__ == "__main__":
    main()
