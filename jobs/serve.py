"""`ray job submit` entrypoint: serve exports on the cluster's Ray Serve.

    ray job submit --working-dir . -- python jobs/serve.py \
        --checkpoint /mnt/cluster_storage/runs/quickstart/export --host 0.0.0.0

The job lasts as long as the app: `ray job stop` deletes it (add --no-block to deploy and return).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neuraflex_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
