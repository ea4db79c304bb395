"""What kind of text each token is, for the expert-specialisation table (`eval/routing.py`).

No model and no download: a regex lexer for Python source, and closed-class word lists plus
spelling for English prose. Both label characters first; a token then takes the kind of its
non-space characters (the most frequent one), or `whitespace` when it has none. Held-out blocks
start and end mid-file, so the code lexer never needs a whole, valid program.
"""

from __future__ import annotations

import keyword
import re
from collections import Counter

CODE_KINDS = ("keyword", "identifier", "number", "string", "comment/docstring", "whitespace/indent", "operator")
PROSE_KINDS = ("function word", "capitalised", "verb -ing/-ed", "adverb -ly", "other word", "number", "punctuation",
               "whitespace")

_CODE = re.compile(r"""
    (?P<doc>[rRbBuUfF]{0,2}(?:\"\"\"[\s\S]*?(?:\"\"\"|$)|'''[\s\S]*?(?:'''|$)))
  | (?P<comment>\#[^\n]*)
  | (?P<string>[rRbBuUfF]{0,2}(?:"(?:\\.|[^"\\\n])*"?|'(?:\\.|[^'\\\n])*'?))
  | (?P<number>\b(?:0[xXoObB][0-9a-fA-F_]+|\d[\d_]*\.?\d*(?:[eE][+-]?\d+)?j?)\b|\.\d+)
  | (?P<name>[A-Za-z_]\w*)
  | (?P<space>\s+)
  | (?P<op>.)
""", re.VERBOSE)
_CODE_KIND = {"doc": "comment/docstring", "comment": "comment/docstring", "string": "string", "number": "number",
              "space": "whitespace/indent", "op": "operator"}

# Closed-class English words: articles, pronouns, prepositions, conjunctions, auxiliaries (and the
# archaic forms of the King James Bible, the prose sample).
FUNCTION_WORDS = frozenset("""
a an the this that these those i me my mine we us our ours you your yours he him his she her hers it its
they them their theirs who whom whose which what there here thou thee thy thine ye
of in on at by for with from to into unto upon out up down over under about above below between among
through before after against without within toward towards
and or but nor so yet if then than because as while when where whether though although lest
is are was were be been being am do does did doth hath have has had shall will would should can could may
might must art wast shalt wilt not no
""".split())

_PROSE = re.compile(r"(?P<word>[^\W\d_]+(?:'[^\W\d_]+)?)|(?P<number>\d+(?:[.,:]\d+)*)|(?P<space>\s+)|(?P<punct>.)")


def kinds_for(manifest: dict) -> str:
    """Which lexer suits a text dataset (its manifest): "code" for Python sources, else "prose"."""
    source = str(manifest.get("source", ""))
    return "code" if source == "stdlib" or source.endswith(".py") else "prose"


def kind_names(kinds: str) -> tuple[str, ...]:
    return CODE_KINDS if kinds == "code" else PROSE_KINDS


def _word_kind(w: str) -> str:
    lower = w.lower()
    if lower in FUNCTION_WORDS:
        return "function word"
    if w[0].isupper():
        return "capitalised"
    if lower.endswith(("ing", "ed")) and len(lower) > 4:
        return "verb -ing/-ed"
    if lower.endswith("ly") and len(lower) > 4:
        return "adverb -ly"
    return "other word"


def char_kinds(text: str, kinds: str) -> list[str]:
    """One kind per character of `text` (`kinds`: "code" or "prose")."""
    out: list[str] = []
    if kinds == "code":
        for m in _CODE.finditer(text):
            g = m.lastgroup or "op"
            kind = ("keyword" if keyword.iskeyword(m.group()) or keyword.issoftkeyword(m.group()) else "identifier") \
                if g == "name" else _CODE_KIND[g]
            out += [kind] * len(m.group())
    elif kinds == "prose":
        for m in _PROSE.finditer(text):
            g = m.lastgroup
            kind = _word_kind(m.group()) if g == "word" else {"number": "number", "space": "whitespace",
                                                              "punct": "punctuation"}[g]
            out += [kind] * len(m.group())
    else:
        raise ValueError(f"kinds={kinds!r}: use 'code' or 'prose'")
    return out


def token_kinds(pieces: list[str], kinds: str) -> list[str]:
    """The kind of each token, given the text each token decodes to (in order, concatenated = the text)."""
    per_char = char_kinds("".join(pieces), kinds)
    space = "whitespace/indent" if kinds == "code" else "whitespace"
    out, pos = [], 0
    for piece in pieces:
        chars = [k for c, k in zip(piece, per_char[pos:pos + len(piece)], strict=True) if not c.isspace()]
        out.append(Counter(chars).most_common(1)[0][0] if chars else space)
        pos += len(piece)
    return out
