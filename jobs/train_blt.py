"""`ray job submit` entrypoint: train the byte-level BLT (its entropy model first, as a stage of the job;
DeepSpeed ZeRO-2 + expert parallelism in the global transformer).

    ray job submit --working-dir . -- python jobs/train_blt.py --config jobs/configs/blt_debug.yaml train.max_steps=100
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, wherever the job runs

from neuraflex_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
