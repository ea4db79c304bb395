"""Held-out evaluation, each model figure beside a baseline fitted on training data only.

The LM: `lm.py` (bits per byte, the bigram baseline, an export's held-out evaluation) and
`calibration.py` (the confidence temperature fitted at export); `routing.py` with `token_kinds.py`
(which kinds of token each expert takes). NeuroFM: `neuro.py` (the entry point) over `forecast.py`,
`spatial.py` with `adapt.py` and `retrieval.py`, with `ridge.py` and `common.py` beneath them;
`probe.py` (decoding labelled tasks from frozen embeddings, beside a logistic regression on
classical physiological features; `probe_labels.py`: which recordings have labels and their rules,
`probe_tasks.py`: a session as pretraining prepared it, split at time cuts), `collapse.py` with
`embedding_stats.py` (spread and effective rank), `bootstrap.py` (intervals) and `fewshot.py` (the
systole tasks learned by LoRA from 1, 5 and 25 windows per class).
"""
