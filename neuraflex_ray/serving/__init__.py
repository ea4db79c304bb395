"""Serving: the Ray Serve applications (app.py), the LM engine (engine.py) and what they hold."""

import os

# Batch invariance (engine.py: a request's text never depends on its batch-mates) needs MKL's GEMM to give
# a row the same bits wherever it sits in the batch's memory. Without MKL's conditional numerical
# reproducibility, results depend on the data's alignment: a Titans request scored 1e-6 apart alone and
# in slot 15 of a batch. STRICT makes them alignment-independent on the fastest code path MKL finds
# (AUTO). MKL reads it before its first call, so it is set when this package is imported, before any
# model here runs; a user's own setting wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
