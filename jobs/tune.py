"""`ray job submit` entrypoint: a hyperparameter sweep (Ray Tune over real Ray Train runs).

    ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/tune_moe_debug.yaml
    ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/tune_moe_debug.yaml --resume
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, wherever the job runs

from neuraflex_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
