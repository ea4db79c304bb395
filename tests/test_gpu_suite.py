"""The GPU suite's dry run: the same code paths as on a GPU, tiny, on CPU (it measures nothing here)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_suite_dry_run_runs_every_section_on_cpu():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--dry-run"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)  # stdout is the JSON alone: DeepSpeed's chatter went to stderr
    assert out["dry_run"] is True
    for name in ("peak", "moe_layer", "train_small", "neurofm_fsdp", "decode_small"):
        assert "error" not in out[name], (name, out[name]["error"])
    # DeepSpeed is installed here, so the MoE layer is compared with it, in bf16, on the same weights.
    moe = out["moe_layer"]
    assert moe["config"]["dtype"] == "bfloat16"
    assert moe["max_abs_diff_vs_dropless"]["deepspeed"] < 0.05
    assert moe["speedup_dropless_vs_deepspeed"] > 0
    # Both training modes ran steps (the compiled one through Dynamo's graph capture), and so did decode.
    for mode in ("eager", "compiled"):
        assert out["train_small"][mode]["tokens_per_s"] > 0
    assert out["train_small"]["compile_speedup"] > 0
    assert out["neurofm_fsdp"]["windows_per_s"] > 0
    assert out["decode_small"]["batch_1"]["tokens_per_s"] > 0 and out["decode_small"]["batch_4"]["tokens_per_s"] > 0
    # No datasheet peak for a CPU: the GPU MFU is unknown here rather than made up.
    assert math.isnan(out["peak"]["datasheet_bf16_flops"]) and out["peak"]["measured_bf16_matmul_flops"] > 0
