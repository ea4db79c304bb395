"""A retrieval memory an LM reads at inference: kNN-LM (Khandelwal et al., ICLR 2020).

The memory stores, for every position of a corpus, the LM's final normalised hidden state (the key)
and the token that followed it (the value). At inference the current hidden state's nearest keys
vote for their values, p_kNN(y) ∝ Σ count_j · exp(-d_j / T) over neighbours j with value y, and
the output is (1 - λ) p_LM + λ p_kNN: no gradient step, and swapping the datastore moves the model
to another domain.

    config.py    DatastoreConfig: neighbours, shards, de-duplication, FAISS index parameters
    keys.py      the keys of token blocks (in process, and as a Ray Data actor that writes shards)
    build.py     `build_datastore`: corpus -> Ray Data actor pool -> Parquet shards -> FAISS indexes
    dedup.py     merging near-duplicate keys with the same next token (a count keeps their weight)
    index.py     exact (Flat), compressed (IVF-PQ) and graph (HNSW) indexes from per-shard parts
    store.py     `Datastore`: a built memory opened for search, checked against the export
    mixing.py    p_kNN from neighbours, λ gates (fixed or a function of the nearest distance), mixing
"""
