"""Text features of a prompt, computed in the gateway in microseconds: TF-IDF of its words and its length.

A probe may read them beside the scorer's activations (one linear model over both). Everything needed to
compute them (vocabulary, idf, which parts) travels inside the probe file, and ``digest`` covers all of it,
so a probe is always scored with the text features it was trained on.

The text is ``prompt_text(messages)``: the messages' contents as the scorer reads them (``normalise_messages``),
without the chat template, which adds the same words to every prompt. The recipe is scikit-learn's
``TfidfVectorizer(lowercase=True, token_pattern=r"(?u)\\b\\w\\w+\\b", ngram_range=(1, n), sublinear_tf=True,
norm="l2")`` applied with a fixed vocabulary and idf (tests check the two agree), then ``log(1 + words)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from router.scorer.recipe import Message, normalise_messages

TOKEN_PATTERN = r"(?u)\b\w\w+\b"
_TOKEN = re.compile(TOKEN_PATTERN)


def prompt_text(messages: Sequence[Message]) -> str:
    """The text the text features read: every message's content, one after the other."""
    return "\n".join(m["content"] for m in normalise_messages(messages))


def words(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


@dataclass(frozen=True)
class TextFeatures:
    """[TF-IDF of the vocabulary's terms ‖ log(1 + word count)] (either part may be absent)."""

    vocabulary: tuple[str, ...]  # term i is column i
    idf: np.ndarray
    ngram_max: int = 2
    length: bool = True

    def __post_init__(self) -> None:
        if len(self.vocabulary) != len(self.idf):
            raise ValueError("one idf per vocabulary term")
        object.__setattr__(self, "_index", {t: i for i, t in enumerate(self.vocabulary)})

    @property
    def dim(self) -> int:
        return len(self.vocabulary) + int(self.length)

    def spec(self) -> dict[str, Any]:
        """Everything but the vocabulary and idf (which a probe keeps in its tensors and JSON)."""
        return {"kind": "tfidf+length" if self.length else "tfidf", "token_pattern": TOKEN_PATTERN,
                "lowercase": True, "ngram_max": self.ngram_max, "sublinear_tf": True, "norm": "l2",
                "length": "log1p(words)" if self.length else None, "dim": self.dim}

    @property
    def digest(self) -> str:
        h = hashlib.sha256(json.dumps(self.spec(), sort_keys=True).encode())
        h.update("\x1e".join(self.vocabulary).encode())
        h.update(np.ascontiguousarray(self.idf, dtype=np.float32).tobytes())
        return h.hexdigest()[:16]

    def sparse_row(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(column indices, values) of one text's non-zero features."""
        tokens = words(text)
        grams: Counter[str] = Counter(tokens)
        for n in range(2, self.ngram_max + 1):
            grams.update(" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
        index: Mapping[str, int] = self._index  # type: ignore[attr-defined]
        cols, vals = [], []
        for term, count in grams.items():
            j = index.get(term)
            if j is not None:
                cols.append(j)
                vals.append((1.0 + math.log(count)) * self.idf[j])
        values = np.array(vals, dtype=np.float64)
        norm = math.sqrt(float(values @ values)) if vals else 0.0
        if norm > 0:
            values /= norm
        if self.length:
            cols.append(len(self.vocabulary))
            values = np.append(values, math.log1p(len(tokens)))
        return np.array(cols, dtype=np.int64), values

    def dense(self, texts: Sequence[str]) -> np.ndarray:
        """Features of ``texts``, one dense row each (float64)."""
        out = np.zeros((len(texts), self.dim))
        for i, text in enumerate(texts):
            cols, vals = self.sparse_row(text)
            out[i, cols] = vals
        return out

    def sparse(self, texts: Sequence[str]) -> Any:
        """Features of ``texts`` as a scipy CSR matrix (for training)."""
        from scipy.sparse import csr_matrix

        indptr, cols, vals = [0], [], []
        for text in texts:
            c, v = self.sparse_row(text)
            cols.append(c)
            vals.append(v)
            indptr.append(indptr[-1] + len(c))
        return csr_matrix((np.concatenate(vals) if vals else np.zeros(0),
                           np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64), indptr),
                          shape=(len(texts), self.dim))
