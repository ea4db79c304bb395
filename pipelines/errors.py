"""The error an unusable input file raises: a ConfigError (the command line prints it as one line and
exits 2) whose message names the file, where in it (a line, a record), the problem and the fix."""

from __future__ import annotations

from neuraflex_ray.config import ConfigError


class BadInput(ConfigError):
    """An input file that cannot be used: a truncated Parquet shard, a corrupt recording, a JSON
    line that is not JSON."""
