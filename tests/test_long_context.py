"""eval/long_context.py: the recall rows plant what they say where they say, training never sees
evaluation's keys or values, and the scores read the right logits (a character-level tokenizer)."""

import math
import re

import numpy as np
import pytest
import torch

from neuraflex_ray.eval.long_context import (
    held_out,
    long_document_bpb,
    pair_line,
    query_text,
    recall_accuracy,
    recall_cases,
    training_documents,
)

TEXT = ("def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 400)
PAIR = re.compile(r"memo\['(\w+)'\] = '(\w+)'")


def encode(s: str) -> list[int]:
    return [ord(c) for c in s]


def decode(ids) -> str:
    return "".join(chr(int(i)) for i in ids)


@pytest.mark.parametrize("kind", ["kv", "needle"])
def test_rows_end_at_the_query_with_the_pair_planted_d_windows_back(kind):
    cases = recall_cases(encode, encode(TEXT), kind=kind, context=600, window=64, distance_windows=4, n=12)
    assert cases.tokens.shape == (12, 600)
    for row, cands, answer, dist in zip(cases.tokens, cases.candidates, cases.answer, cases.distance, strict=True):
        text = decode(row)
        key = re.search(r"assert memo\['(\w+)'\] == '$", text).group(1)
        planted = dict(PAIR.findall(text))
        assert len(planted) == (8 if kind == "kv" else 1)
        value = planted[key]
        assert cands[answer] == ord(value[0]) and len(set(cands.tolist())) == 8  # distinct first tokens
        assert held_out(key) and held_out(value)
        line_start = text.index(pair_line(key, value))
        assert dist == 599 - line_start and abs(dist - 4 * 64) <= 80  # 4 windows back, give or take the block


def test_training_documents_hold_no_evaluation_key_or_value():
    docs = training_documents([TEXT], 40, chars_per_window=64, seed=1)
    pairs = [p for d in docs for p in PAIR.findall(d)]
    asked = [m for d in docs for m in re.findall(r"assert memo\['(\w+)'\] == '(\w+)'", d)]
    assert len(pairs) >= 40 and asked
    assert not any(held_out(s) for p in pairs + asked for s in p)
    assert all(dict(pairs)[k] == v for k, v in asked)  # every answer is the planted value


def test_recall_accuracy_reads_the_candidates_logits():
    cases = recall_cases(encode, encode(TEXT), kind="kv", context=400, window=32, distance_windows=8, n=16)

    def oracle(rows: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(rows), 128)
        for i, row in enumerate(rows):
            text = decode(row)
            key = re.search(r"memo\['(\w+)'\] == '$", text).group(1)
            out[i, ord(dict(PAIR.findall(text))[key][0])] = 1.0
        return out

    assert recall_accuracy(oracle, cases) == 1.0
    # All candidates tied: the first wins, right exactly when the answer is candidate 0.
    assert recall_accuracy(lambda rows: torch.zeros(len(rows), 128), cases) == np.mean(cases.answer == 0)


def test_long_document_bpb_of_a_uniform_model():
    docs = [encode(TEXT[:300]), encode(TEXT[:100])]  # the short one is left out
    out = long_document_bpb(lambda rows: torch.zeros(1, rows.shape[1], 128), docs, decode, 200)
    assert out["documents"] == 1 and out["bpb"] == pytest.approx(math.log2(128))  # one byte per token
    with pytest.raises(ValueError, match="context"):
        recall_cases(encode, encode("x" * 50), kind="kv", context=600, window=64, distance_windows=1, n=1)
    assert query_text("ab12").endswith("== '")
