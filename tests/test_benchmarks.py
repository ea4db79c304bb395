"""The benchmarks run and print the JSON shape RESULTS.md relies on (tiny shapes; nothing is timed here)."""

import json
import subprocess
import sys


def test_moe_layer_benchmark_prints_json():
    out = subprocess.run(
        [sys.executable, "benchmarks/moe_layer.py", "--tokens", "64", "--dim", "32", "--ffn", "64",
         "--experts", "4", "--top-k", "2", "--repeats", "1"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    result = json.loads(out.stdout)
    for impl in ("dropless", "deepspeed", "naive"):
        assert result[impl]["tokens_per_s"] > 0
    assert result["config"]["experts"] == 4
    # Same weights, nothing dropped: the three executions agree.
    assert max(result["max_abs_diff_vs_dropless"].values()) < 1e-5


def test_serve_load_benchmark_prints_json():
    out = subprocess.run(
        [sys.executable, "benchmarks/serve_load.py", "--flavour", "tiny", "--kv-flavours", "tiny", "--max-tokens", "4",
         "--requests-per-client", "1", "--concurrency", "1", "2", "--kv-tokens", "16"],
        capture_output=True, text=True, timeout=600, check=True,
    )
    result = json.loads(out.stdout)
    assert {(r["batching"], r["batch_invariant"], r["concurrency"]) for r in result["runs"]} == {
        (b, i, c) for b, i in ((True, True), (True, False), (False, False)) for c in (1, 2)}
    assert all(r["tokens"] == 4 * r["requests"] and r["p99_ms"] >= r["p50_ms"] > 0 for r in result["runs"])
    kv = result["kv_cache"]
    assert kv["tokens"] == 16 and kv["with_cache_s"] > 0 and kv["recompute_s"] > 0
