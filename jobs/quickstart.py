"""`ray job submit` entrypoint for the whole chain: data -> train -> export -> eval -> generate.

    ray job submit --working-dir . -- python jobs/quickstart.py --config jobs/configs/moe_debug.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neuraflex_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["quickstart", *sys.argv[1:]]))
