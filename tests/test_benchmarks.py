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
