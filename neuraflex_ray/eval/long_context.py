"""Long-context evaluation: recall planted far behind the attention window, and bits/byte on long text.

Recall exercises are Python lines planted in stdlib text, so they read like the corpus:

    memo['3fa9'] = 'qzvk'          (a block of pairs, planted d windows before the query)
    ...                            (held-out text)
    assert memo['3fa9'] == '       (the query: the next token starts the value)

`recall_cases` builds rows of exactly `context` tokens that end at the query, the queried pair's
line starting d attention windows before the end (or as near to that as the rows's length and the
block of pairs allow: `RecallSet.distance` has each row's real distance).
The score is the share of rows where the model's next-token logits rank the right value's first
token first among the candidates' (values are drawn with distinct first tokens); chance is
1 / candidates. Two kinds: `kv` plants `pairs` pairs and asks one (candidates: the planted values,
so the model must match the key), `needle` plants one pair (candidates: its value and unplanted
ones). Keys and values are split by a hash (`held_out`): training documents (`training_documents`)
never contain a key or value that evaluation uses.

`long_document_bpb` scores the first `context` tokens of held-out documents at least that long.
"""

from __future__ import annotations

import math
import random
import string
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

KEY_CHARS, KEY_LEN = "0123456789abcdef", 4
VALUE_CHARS, VALUE_LEN = string.ascii_lowercase, 4
HELD_OUT_EVERY = 8  # one key or value string in 8 belongs to evaluation


def held_out(s: str) -> bool:
    """Whether a key or value string is evaluation's (training never draws it)."""
    return zlib.crc32(s.encode()) % HELD_OUT_EVERY == 0


def draw(rng: random.Random, chars: str, length: int, evaluation: bool) -> str:
    while True:
        s = "".join(rng.choice(chars) for _ in range(length))
        if held_out(s) == evaluation:
            return s


def pair_line(key: str, value: str) -> str:
    return f"memo['{key}'] = '{value}'\n"


def query_text(key: str) -> str:
    return f"assert memo['{key}'] == '"


def training_documents(texts: Sequence[str], n_docs: int, *, chars_per_window: int, max_windows: int = 7,
                       max_pairs: int = 8, seed: int = 0) -> list[str]:
    """`n_docs` documents of corpus text with recall exercises planted: each plants a block of 1 to
    `max_pairs` pairs, then 1 to `max_windows` windows of text, then queries two of them with their
    answers (so the next-token loss teaches recall). Only training's keys and values are drawn."""
    rng = random.Random(seed)
    flat = "\n".join(texts)

    def filler(n_chars: int) -> str:
        at = rng.randrange(0, max(1, len(flat) - n_chars))
        return flat[at:at + n_chars] + "\n"

    docs = []
    for _ in range(n_docs):
        pairs = [(draw(rng, KEY_CHARS, KEY_LEN, False), draw(rng, VALUE_CHARS, VALUE_LEN, False))
                 for _ in range(rng.randint(1, max_pairs))]
        asked = rng.sample(pairs, min(2, len(pairs)))
        gap = filler(int(rng.uniform(1.0, max_windows) * chars_per_window))
        docs.append(filler(rng.randrange(chars_per_window)) + "".join(pair_line(k, v) for k, v in pairs) + gap
                    + "".join(f"{query_text(k)}{v}'\n" for k, v in asked))
    return docs


@dataclass
class RecallSet:
    tokens: np.ndarray  # [n, context] rows that end with a query
    candidates: np.ndarray  # [n, c] first token ids of the candidate values
    answer: np.ndarray  # [n] index of the right candidate
    distance: np.ndarray  # [n] tokens from the queried pair's line to the row's last token


def recall_cases(encode: Callable[[str], list[int]], filler: Sequence[int], *, kind: str, context: int, window: int,
                 distance_windows: int, n: int, candidates: int = 8, seed: int = 0) -> RecallSet:
    """`n` rows of `kind` ("kv" or "needle") with the queried pair d = `distance_windows` windows back,
    planted in `filler` (held-out token ids, at least `context` of them)."""
    if kind not in ("kv", "needle"):
        raise ValueError(f"kind={kind!r}: use 'kv' or 'needle'")
    if len(filler) < context:
        raise ValueError(f"{len(filler)} filler tokens: need at least context={context}")
    rng = random.Random(seed * 1000 + distance_windows)
    rows, cands, answers, dists = [], [], [], []
    while len(rows) < n:
        values, firsts = [], []
        while len(values) < candidates:  # distinct first tokens: the first logit tells them apart
            v = draw(rng, VALUE_CHARS, VALUE_LEN, True)
            if (first := encode(v)[0]) not in firsts:
                values.append(v)
                firsts.append(first)
        keys = [draw(rng, KEY_CHARS, KEY_LEN, True) for _ in values]
        if len(set(keys)) < len(keys):
            continue
        j = rng.randrange(candidates)
        planted = list(range(candidates)) if kind == "kv" else [j]
        lines = [encode(pair_line(keys[i], values[i])) for i in planted]
        block = [t for line in lines for t in line]
        offset = sum(len(line) for line in lines[:planted.index(j)])  # the queried line inside the block
        query = encode(query_text(keys[j]))
        # d windows back, or as far back as fits (a block longer than d windows: recorded in `distance`).
        start = max(0, min(context - distance_windows * window - offset, context - len(block) - len(query)))
        gap = context - start - len(block) - len(query)
        if gap < 0:
            raise ValueError(f"{candidates} planted pairs and the query do not fit in context={context} tokens")
        at = rng.randrange(0, len(filler) - context + 1)
        text = list(filler[at:at + context])
        rows.append(text[:start] + block + text[start + len(block):start + len(block) + gap] + query)
        cands.append(firsts)
        answers.append(j)
        dists.append(context - 1 - (start + offset))
    return RecallSet(np.asarray(rows, dtype=np.int64), np.asarray(cands), np.asarray(answers), np.asarray(dists))


@torch.no_grad()
def recall_accuracy(next_logits: Callable[[torch.Tensor], torch.Tensor], cases: RecallSet,
                    batch_size: int = 8) -> float:
    """Share of rows whose right value's first token outranks the other candidates'. `next_logits`
    maps rows [B, T] to the logits after their last token [B, V]."""
    hits = 0
    for i in range(0, len(cases.tokens), batch_size):
        logits = next_logits(torch.from_numpy(cases.tokens[i:i + batch_size]))
        scores = logits.gather(1, torch.from_numpy(cases.candidates[i:i + batch_size]))
        hits += int((scores.argmax(1).numpy() == cases.answer[i:i + batch_size]).sum())
    return hits / len(cases.tokens)


@torch.no_grad()
def long_document_bpb(logits_of: Callable[[torch.Tensor], torch.Tensor], docs: Sequence[Sequence[int]],
                      decode: Callable[[list[int]], str], context: int) -> dict[str, float]:
    """Bits/byte over the first `context` tokens of each document of at least that many tokens:
    `logits_of` maps rows [1, T] to logits [1, T, V]; bytes are those of the predicted tokens."""
    long_docs = [list(d[:context]) for d in docs if len(d) >= context]
    if not long_docs:
        raise ValueError(f"no held-out document has {context} tokens")
    nats, n_bytes = 0.0, 0
    for doc in long_docs:
        ids = torch.tensor([doc])
        logp = logits_of(ids[:, :-1]).float().log_softmax(-1)
        nats -= float(logp.gather(2, ids[:, 1:, None]).sum())
        n_bytes += len(decode(doc[1:]).encode())
    return {"bpb": nats / math.log(2) / n_bytes, "documents": len(long_docs), "tokens": len(long_docs) * (context - 1)}
