"""`python -m neuraflex_ray ...`: the `neuraflex-ray` command line (neuraflex_ray/cli.py)."""

import sys

from neuraflex_ray.cli import main

sys.exit(main())
