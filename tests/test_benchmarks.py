"""The benchmarks run: each at its smallest settings (`--quick --json`), its JSON has the figures.

Nothing here depends on timing; it keeps the benchmarks from rotting as the code changes.
"""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
MACHINE = {"date", "system", "cpu", "cores", "memory_gb", "mlx", "device", "blas", "blas_core"}


def run(name: str, *args: str, folder: Path = BENCHMARKS) -> dict:
    """`folder/NAME.py --quick --json ARGS`'s JSON, which names the machine it ran on."""
    command = [sys.executable, str(folder / f"{name}.py"), "--quick", "--json", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result["machine"]) == MACHINE and result["quick"] is True
    return result


def positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


def test_moe_dispatch():
    result = run("moe_dispatch")
    assert set(result["sites"]) == {"clip", "connector", "mixtral-decode", "mixtral-prefill"}
    for name, site in result["sites"].items():
        variants = {"dense x2", "auto", "gather", "grouped", "loop", "all-experts"}
        variants |= {"mlx-lm"} if "mixtral" in name else set()
        assert set(site["variants"]) == variants and site["auto_path"] in ("gather", "grouped")
        for variant, figures in site["variants"].items():
            assert positive(figures["seconds"]) and positive(figures["ratio"]) and figures["runs"] >= 1
            if variant != "dense x2":  # every dispatch computes the same outputs
                assert figures["max_abs_diff"] < 1e-4, (name, variant)
    assert result["sites"]["mixtral-decode"]["auto_path"] == "gather"


def test_vision_encode():
    result = run("vision_encode")
    assert set(result["timings"]) == {"ours MoE", "ours dense", "torch dense"}
    assert all(positive(t["seconds"]) for t in result["timings"].values())
    assert set(result["ratios"]) == {"ours MoE / torch dense", "ours dense / torch dense", "ours MoE / ours dense"}
    assert result["crops"] == 10


def test_generate():
    result = run("generate")
    assert set(result["llm"]) == {"mistral 2L float", "mistral 2L 4-bit", "mixtral 1L float", "mixtral 1L 4-bit"}
    for figures in result["llm"].values():
        for impl in ("ours", "mlx-lm"):
            assert all(positive(figures[impl][k]) for k in ("prefill_tps", "decode_tps", "peak_gb", "decode_bytes_per_s"))
            assert figures[impl]["decode_of_copy_bandwidth"] == figures[impl]["decode_bytes_per_s"] / figures["copy_bytes_per_s"]
        assert positive(figures["decode_ratio"]) and positive(figures["prefill_ratio"])
    # What one token reads in the quick Mixtral (hidden 128, 2 of 4 heads' width for K/V, 8 experts of
    # 448, top-2; vocab 32000), float32: attention, 2/8 of the experts, router, norms, lm_head, and the
    # KV cache of 24 prompt + 4/2 decoded positions on average. Not the embedding table.
    weights = 2 * 128 * 128 + 2 * 128 * 64 + 3 * 8 * 448 * 128 * 2 // 8 + 8 * 128 + 3 * 128 + 32000 * 128
    assert result["llm"]["mixtral 1L float"]["decode_bytes_per_token"] == 4 * weights + 2 * 2 * 32 * 26 * 4
    image = result["image"]
    assert positive(image["encode_s"]) and image["positions"] > 0
    for precision in ("float", "4-bit"):
        assert all(positive(image[precision][k]) for k in ("prefill_32_layers_tps", "prefill_32_layers_s"))
    memory = result["memory"]
    assert set(memory["weights_bytes"]) == {"vision_tower", "connector", "llm"}
    assert memory["estimated_peak_bytes"] > sum(memory["weights_bytes"].values()) > 0
    # convert -q's 8-bit vision side between the float16 and the 4-bit one
    assert memory["4bit_vision_estimated_peak_gb"] < memory["estimated_peak_gb"] < memory["float16_vision_estimated_peak_gb"]


def test_convert_memory():
    result = run("convert_memory")
    assert result["checkpoint"]["shards"] == 3
    assert result["bound"] == result["checkpoint"]["largest_shard"] + result["checkpoint"]["largest_tensor"]
    for precision in ("float16", "4-bit"):
        figures = result["conversions"][precision]
        assert {"peak_rss_above_baseline", "mlx_peak", "peak_over_bound", "peak_over_checkpoint"} <= set(figures)


def test_blas_matmul():
    result = run("blas_matmul")
    assert {"loaded", "bundled"} <= set(result["runs"]) and result["runs"]["bundled"]["blas"] is None
    assert all(positive(r["gflops"]) and positive(r["row_gb_per_s"]) for r in result["runs"].values())
    assert positive(result["speedup"])


def test_train_memory():
    result = run("train_memory")
    assert set(result["modes"]) == {"lora", "full"}
    for figures in result["modes"].values():
        assert set(figures["runs"]) == {"1x2", "2x2", "1x3"}
        assert all(positive(r["peak_gb"]) and 0 < r["trainable"] <= r["parameters"] for r in figures["runs"].values())
        assert figures["cumo_7b_peak_gb"] > figures["runs"]["1x2"]["peak_gb"]
    assert result["modes"]["lora"]["runs"]["1x2"]["trainable"] < result["modes"]["full"]["runs"]["1x2"]["trainable"]


def test_serve():
    result = run("serve")
    assert set(result["models"]) == {"demo", "mistral-7b"}
    for figures in result["models"].values():
        assert set(figures["runs"]) == {"1", "4", "16"}
        for clients, run_ in figures["runs"].items():
            assert run_["requests"] == int(clients) and run_["errors"] == 0 and run_["mismatched"] == 0
            assert positive(run_["tokens_per_s"]) and run_["ttft_p50_s"] <= run_["ttft_p95_s"]
        assert positive(figures["speedup"]) and positive(figures["vision_cache"]["miss_over_hit"])


def test_batch_generate():
    result = run("batch_generate")
    assert set(result["throughput"]) == {"demo", "mistral 2L float32", "mistral 2L 4-bit", "mixtral 1L float32"}
    for figures in result["throughput"].values():
        for case in ("single runs", "ours 1", "ours 2", "mlx-lm 1", "mlx-lm 2"):
            assert positive(figures[case]["tps"]) and positive(figures[case]["decode_tps"])
        assert figures["matches_single"] is True and figures["matches_mlx_lm"] is True  # greedy: the same answers
    ttft = result["ttft"]
    for case in ("first seen", "seen (vision cache)", "seen (vision + prompt cache)"):
        assert positive(ttft[case]["seconds"]) and positive(ttft[case]["speedup"])


def test_quantize_vision():
    result = run("quantize_vision")
    memory = result["memory"]
    assert set(memory) == {"float16", "8-bit", "4-bit"}
    sizes = [memory[name]["vision_side_bytes"] for name in ("float16", "8-bit", "4-bit")]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] > 0
    for by_bits in result["random"].values():
        assert set(by_bits) == {"8", "4"}
        for figures in by_bits.values():
            assert 0 <= figures["mean_logit_error"] <= figures["max_logit_error"]
            assert 0 <= figures["top_token_agreement"] <= 1 and 0 <= figures["greedy_token_agreement"] <= 1
    demo = result["demo"]
    assert demo["questions"] > 0 and demo["float16"]["same_answer_as_float16"] == 1.0
    assert all(0 <= demo[name]["accuracy"] <= 1 for name in ("float16", "8-bit", "4-bit"))
