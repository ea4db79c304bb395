"""Held-out evaluation, each model figure beside a baseline fitted on training data only.

`lm.py`: bits per byte and the bigram baseline. NeuroFM: `neuro.py` (the entry point) over
`forecast.py`, `spatial.py` and `retrieval.py`, with `ridge.py` and `common.py` beneath them.
`probe.py`: decoding labelled tasks (`probe_tasks.py`: the systole recording's trial onsets) from frozen
NeuroFM embeddings, beside a logistic regression on classical physiological features.
"""
