"""`python -m neuraflex_ray.cli ...`: the same as `neuraflex-ray ...`."""

import sys

from neuraflex_ray.cli import main

sys.exit(main())
