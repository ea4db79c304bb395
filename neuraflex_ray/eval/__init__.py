"""Held-out evaluation, each model figure beside a baseline fitted on training data only.

`lm.py`: bits per byte and the bigram baseline. NeuroFM: `neuro.py` (the entry point) over
`forecast.py`, `spatial.py` and `retrieval.py`, with `ridge.py` and `common.py` beneath them.
"""
