"""The Byte Latent Transformer family (issue 26), being built: raw bytes in, no tokenizer.

There is no `FAMILY` here yet, and `model_type: blt` is not registered. What exists: the model in
one process (`neuraflex_ray/models/blt.py`, its patching rules in `models/blt_patching.py`) and its
data side: `data.py` turns a corpus into byte blocks with a byte-level LM's per-byte entropies beside
them (the entropies decide where patches end), and `entropy.py` is that scoring, in a Ray Data actor
and in one process alike.
"""
