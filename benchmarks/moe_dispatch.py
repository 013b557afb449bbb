"""MoE dispatch efficiency: a top-2 SparseMoE block's time over that of 2 dense MLPs on the same tokens.

    python benchmarks/moe_dispatch.py [--quick] [--json] [--repeats 5] [--budget 60] [--min-seconds 60]
        [--mixtral-hidden 4096] [--mixtral-intermediate 14336] [--mixtral-experts 8]

Top-2 routing sends every token through 2 experts: the work of 2 dense MLPs of the expert's shape
over all the tokens. The ratio (block time / time of those 2 dense MLPs) is the dispatch efficiency:
1.0 means that routing costs nothing. Measured at CuMo's three MoE sites:

  clip             10 crops x 577 tokens (one image at S2 [1, 3]), 1024 -> 4096 -> 1024 quick_gelu, 4 experts
  connector        576 tokens, 2048 -> 4096 -> 4096 gelu, 4 experts
  mixtral-decode   1 token, 4096 -> 14336 -> 4096 SwiGLU, 8 experts
  mixtral-prefill  512 tokens, the same

for each way of dispatching the tokens:

  auto             `SparseMoE` as it runs by default (the path it picks is shown)
  gather           forced: gather_mm over token-expert pairs, sorted by expert when many
  grouped          forced: tokens grouped by expert on the host, one dense matmul per expert
  loop             the original's dispatch: for each batch element and expert, find its tokens
                   (torch.where), run the expert on them, add into the output
  all-experts      every expert on every token, outputs mixed with a dense [tokens, experts] weight
  mlx-lm           mlx-lm's Mixtral block (SwitchGLU: sorted gather_mm), same weights (Mixtral only)

Weights are random (routing is balanced, as a trained router's roughly is). float32 on the CPU
backend (its half-precision matmuls have no BLAS path), float16 on a GPU. The Mixtral experts take
5.6 GB in float32; --mixtral-* reduce them (the table says so). Cases run in interleaved rounds,
at least --repeats, more while a site's rounds took under --min-seconds (the fast decode site gets
many runs); slow cases (gather_mm on the CPU is ~30x a dense matmul) stop repeating after --budget
seconds. Where auto picks a path, the forced line of that path is the same computation: the
difference between the two shows how much a shared machine's load moves the medians.
"""

from dataclasses import asdict, dataclass
from types import SimpleNamespace

import harness
import mlx.core as mx
import numpy as np
from cumo_mlx.models import moe
from cumo_mlx.models.moe import MLP, SparseMoE, route
from mlx_lm.models.llama import MLP as DenseGLU
from mlx_lm.models.mixtral import MixtralSparseMoeBlock
from mlx_lm.models.mixtral import ModelArgs as MixtralArgs

MIXTRAL = {"hidden": 4096, "intermediate": 14336, "experts": 8}


@dataclass
class Site:
    name: str
    batch: int  # leading dimension: crops for CLIP (the original loops over it)
    tokens: int  # per batch element
    input_dims: int
    hidden_dims: int
    output_dims: int
    num_experts: int
    activation: str
    top_k: int = 2

    @property
    def pairs(self) -> int:
        return self.batch * self.tokens * self.top_k


def sites(mixtral: dict, quick: bool) -> list[Site]:
    if quick:
        return [
            Site("clip", 2, 40, 64, 256, 64, 4, "quick_gelu"),
            Site("connector", 1, 48, 128, 256, 256, 4, "gelu"),
            Site("mixtral-decode", 1, 1, 128, 448, 128, 8, "swiglu"),
            Site("mixtral-prefill", 1, 32, 128, 448, 128, 8, "swiglu"),
        ]
    d, h, e = mixtral["hidden"], mixtral["intermediate"], mixtral["experts"]
    return [
        Site("clip", 10, 577, 1024, 4096, 1024, 4, "quick_gelu"),
        Site("connector", 1, 576, 2048, 4096, 4096, 4, "gelu"),
        Site("mixtral-decode", 1, 1, d, h, d, e, "swiglu"),
        Site("mixtral-prefill", 1, 512, d, h, d, e, "swiglu"),
    ]


def build_block(site: Site, dtype: mx.Dtype) -> SparseMoE:
    swiglu = site.activation == "swiglu"
    shape = (site.input_dims, site.hidden_dims, site.output_dims)
    block = SparseMoE(*shape, site.num_experts, site.top_k, site.activation, bias=not swiglu)
    block.set_dtype(dtype)
    mx.eval(block.parameters())
    return block


def dense_mlp(block: SparseMoE, site: Site, expert: int):
    """A dense MLP of the expert's shape holding expert `expert`'s weights (shared, not copied)."""
    if site.activation == "swiglu":
        mlp = DenseGLU(SimpleNamespace(hidden_size=site.input_dims, intermediate_size=site.hidden_dims))
    else:
        mlp = MLP(site.input_dims, site.hidden_dims, site.output_dims, site.activation)
    mlp.update({name: {"weight": layer.weight[expert], **({"bias": layer.bias[expert]} if "bias" in layer else {})}
                for name, layer in block.experts.children().items() if hasattr(layer, "weight")})  # fmt: skip
    mx.eval(mlp.parameters())  # evaluated slices: matmuls read the experts' buffers in place
    return mlp


def mlx_lm_block(block: SparseMoE, site: Site) -> MixtralSparseMoeBlock:
    """mlx-lm's Mixtral MoE block with the same router and experts."""
    args = MixtralArgs(
        model_type="mixtral",
        hidden_size=site.input_dims,
        intermediate_size=site.hidden_dims,
        num_local_experts=site.num_experts,
        num_experts_per_tok=site.top_k,
    )
    theirs = MixtralSparseMoeBlock(args)  # its own random weights stay lazy: never computed
    theirs.gate = block.gate
    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(theirs.switch_mlp, name).weight = getattr(block.experts, name).weight
    return theirs


def per_expert_loop(block: SparseMoE, x: mx.array) -> mx.array:
    """The original's dispatch: per batch element and expert, its tokens found on the host, the
    expert run on them, its weighted output added at their rows."""
    indices, weights = route(block.gate(x).astype(mx.float32), block.top_k)
    chosen = np.array(indices)
    outputs = []
    for b in range(x.shape[0]):
        y = None
        for e in range(block.num_experts):
            tokens, slot = np.nonzero(chosen[b] == e)
            if tokens.size:
                rows = mx.array(tokens)
                h = block.experts(x[b][rows][None], mx.array([e]))[0]
                h = weights[b][rows, mx.array(slot)][:, None].astype(h.dtype) * h
                y = mx.zeros((x.shape[1], h.shape[-1]), h.dtype) if y is None else y
                y = y.at[rows].add(h)
        outputs.append(y)
    return mx.stack(outputs)


def all_experts(block: SparseMoE, x: mx.array) -> mx.array:
    """Every expert on every token, mixed by the routing weights (zero for experts not chosen)."""
    flat = x.reshape(-1, x.shape[-1])
    indices, weights = route(block.gate(flat).astype(mx.float32), block.top_k)
    mixing = ((indices[..., None] == mx.arange(block.num_experts)) * weights[..., None]).sum(axis=1)
    y = sum(mixing[:, e : e + 1] * block.experts(flat[None], mx.array([e]))[0] for e in range(block.num_experts))
    return y.astype(x.dtype).reshape(*x.shape[:-1], -1)


def forced(block: SparseMoE, x: mx.array, mode: str):
    def run():
        moe.set_dispatch(block, mode)
        try:
            return block(x)[0]
        finally:
            moe.set_dispatch(block, "auto")

    return run


def kept(outputs: dict, name: str, fn):
    """`fn` that also keeps its last output in `outputs[name]`."""

    def run():
        outputs[name] = fn()
        return outputs[name]

    return run


def measure_site(site: Site, dtype: mx.Dtype, repeats: int, budget: float, min_seconds: float) -> dict:
    block = build_block(site, dtype)
    dense = [dense_mlp(block, site, e) for e in range(site.top_k)]
    x = mx.random.normal((site.batch, site.tokens, site.input_dims), key=mx.random.key(0)).astype(dtype)
    mx.eval(x)
    cases = {
        "dense x2": lambda: [mlp(x) for mlp in dense],
        "auto": lambda: block(x)[0],
        "gather": forced(block, x, "gather"),
        "grouped": forced(block, x, "grouped"),
        "loop": lambda: per_expert_loop(block, x),
        "all-experts": lambda: all_experts(block, x),
    }
    if site.activation == "swiglu":
        theirs = mlx_lm_block(block, site)
        cases["mlx-lm"] = lambda: theirs(x)
    outputs = {}
    kept_cases = {name: kept(outputs, name, fn) for name, fn in cases.items()}
    timings = harness.time_cases(kept_cases, repeats, budget, min_seconds)
    base = timings["dense x2"]["seconds"]
    for name, t in timings.items():
        t["ratio"] = t["seconds"] / base
        if name != "dense x2":  # every MoE variant computes the same thing
            t["max_abs_diff"] = mx.abs(outputs[name] - outputs["auto"]).max().item()
    return {"shape": asdict(site), "auto_path": moe.dispatch_mode(site.pairs, site.num_experts), "variants": timings}


def main():
    p = harness.parser(__doc__.split("\n")[0])
    p.add_argument("--mixtral-hidden", type=int, default=MIXTRAL["hidden"])
    p.add_argument("--mixtral-intermediate", type=int, default=MIXTRAL["intermediate"])
    p.add_argument("--mixtral-experts", type=int, default=MIXTRAL["experts"])
    p.add_argument("--budget", type=float, default=60.0, help="seconds after which a case stops repeating")
    p.add_argument("--min-seconds", type=float, default=60.0, help="add rounds (fast sites) until they took this long")
    p.add_argument("--sites", default="clip,connector,mixtral-decode,mixtral-prefill", help="comma-separated subset")
    args = p.parse_args()
    dtype = mx.float32 if mx.default_device() == mx.cpu else mx.float16
    mixtral = {name: getattr(args, f"mixtral_{name}") for name in MIXTRAL}
    repeats, min_seconds = (1, 0.0) if args.quick else (args.repeats, args.min_seconds)
    wanted = args.sites.split(",")
    results = {}
    for site in sites(mixtral, args.quick):
        if site.name in wanted:
            results[site.name] = measure_site(site, dtype, repeats, args.budget, min_seconds)

    reduced = not args.quick and mixtral != MIXTRAL
    result = {
        "machine": harness.machine(),
        "dtype": str(dtype),
        "quick": args.quick,
        "mixtral_reduced": reduced,
        "sites": results,
    }
    rows = []
    for name, r in results.items():
        s = r["shape"]
        dims = f"{s['input_dims']}->{s['hidden_dims']}->{s['output_dims']}"
        shape = f"{s['batch']}x{s['tokens']} tok, {dims}, E={s['num_experts']}"
        for variant, t in r["variants"].items():
            label = f"auto ({r['auto_path']})" if variant == "auto" else variant
            rows.append([name, shape, label, t["seconds"] * 1e3, t["ratio"], t["runs"]])
            name = shape = ""
    notes = [f"dtype {dtype}; ratio = time / time of 2 dense MLPs on the same tokens (medians)"]
    if reduced:
        notes.append(f"Mixtral shapes REDUCED to hidden {mixtral['hidden']}, intermediate {mixtral['intermediate']}, "
                     f"{mixtral['experts']} experts (full: 4096, 14336, 8)")  # fmt: skip
    if args.quick:
        notes.append("--quick: tiny shapes, one run each (a smoke test, not a measurement)")
    text = harness.table(["site", "shape", "dispatch", "ms", "ratio", "runs"], rows)
    harness.emit(result, text + "\n\n" + "\n".join(notes), args)


if __name__ == "__main__":
    main()
