"""`ray job submit` entrypoint: fine-tune a NeuralFlex-MoE export (full, LoRA, EWC) on new data.

    ray job submit --working-dir . -- python jobs/finetune.py --from /mnt/cluster_storage/runs/quickstart/export \
        --config jobs/configs/finetune_kjv.yaml finetune.method=lora
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, wherever the job runs

from neuraflex_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
