"""Exact and near-duplicate removal, and the check that no conversation sits in both train and validation.

Exact: the whole conversation (roles, names, weights and text, system prompt included) after Unicode NFKC, case
folding and whitespace collapsing. Near: datasketch MinHash + LSH over character 5-gram shingles of the user and
assistant turns (characters, not words, so Chinese and English are treated alike), each LSH candidate confirmed by the
exact Jaccard similarity of the shingle sets, so the result does not depend on LSH's false positives. The first
occurrence is kept. Near ignores names and weights: the same text with other weights is still a near duplicate.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import BaseModel, Field

from finetune.intake import Row

_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def _content(msg: dict[str, Any]) -> str:
    content = msg.get("content")
    if isinstance(content, list):
        text = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    else:
        text = content if isinstance(content, str) else ""
    # A call is what that turn says: two conversations that call with other arguments are not repeats.
    calls = [c.get("function") or {} for c in msg.get("tool_calls") or () if isinstance(c, dict)]
    return text + "".join(f" {f.get('name')}({f.get('arguments')})" for f in calls if isinstance(f, dict))


def exact_key(messages: list[dict[str, Any]]) -> str:
    # Name and weight change what trains (weight 0: rendered, not learned), so rows differing there are not repeats.
    # An absent weight trains like 1.
    blob = "\x1e".join(f"{m.get('role')}\x1f{normalize(str(m.get('name') or ''))}\x1f{m.get('weight', 1)}\x1f"
                        f"{normalize(_content(m))}" for m in messages)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def shingles(messages: list[dict[str, Any]], k: int = 5) -> set[str]:
    text = " | ".join(normalize(_content(m)) for m in messages if m.get("role") != "system")
    if len(text) <= k:
        return {text}
    return {text[i:i + k] for i in range(len(text) - k + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class Removed(BaseModel):
    line: int
    duplicate_of: int  # line of the row that was kept
    kind: str  # "exact" or "near"
    similarity: float = 1.0
    record: int | None = None  # JSON arrays: Row.record of each, since records can share a line
    duplicate_of_record: int | None = None

    @property
    def key(self) -> tuple[int, int]:
        """The removed row's Row.key."""
        return (self.line, self.record or 0)


def _removed(row: Row, kept: Row, kind: str, similarity: float = 1.0) -> Removed:
    return Removed(line=row.line, record=row.record, duplicate_of=kept.line, duplicate_of_record=kept.record,
                   kind=kind, similarity=similarity)


class DedupReport(BaseModel):
    enabled: bool = True
    method: str = "sha256 of normalized text; MinHash LSH on character shingles, confirmed by exact Jaccard"
    threshold: float
    shingle_size: int
    num_perm: int
    rows_in: int = 0
    exact_removed: int = 0
    near_removed: int = 0
    rows_out: int = 0
    removed: list[Removed] = Field(default_factory=list)


class NearIndex:
    """Rows seen so far, queryable for the most similar one at or above the threshold.

    Rows are named by their position in the caller's list: lines are not unique (a compact JSON array is one line).
    """

    def __init__(self, threshold: float, shingle_size: int = 5, num_perm: int = 128) -> None:
        from datasketch import MinHash, MinHashLSH

        self._minhash = MinHash
        self.threshold = threshold
        self.k = shingle_size
        self.num_perm = num_perm
        # LSH only proposes candidates; set below the real threshold so its false negatives fall on pairs that the
        # exact Jaccard check would reject anyway.
        self.lsh = MinHashLSH(threshold=max(0.3, threshold - 0.2), num_perm=num_perm)
        self.sets: dict[int, set[str]] = {}
        self.representative: dict[int, int] = {}  # position -> position of the kept row it stands for

    def _sketch(self, sh: set[str]):
        m = self._minhash(num_perm=self.num_perm, seed=1)
        m.update_batch(s.encode("utf-8") for s in sorted(sh))
        return m

    def query(self, sh: set[str]) -> tuple[int, float] | None:
        best: tuple[int, float] | None = None
        for pos in sorted(self.lsh.query(self._sketch(sh))):
            sim = jaccard(sh, self.sets[pos])
            if sim >= self.threshold and (best is None or sim > best[1]):
                best = (pos, sim)
        return best

    def add(self, pos: int, sh: set[str], representative: int | None = None) -> None:
        self.sets[pos] = sh
        self.representative[pos] = pos if representative is None else representative
        self.lsh.insert(pos, self._sketch(sh))


def dedup(rows: list[Row], *, near: bool = True, threshold: float = 0.9, shingle_size: int = 5,
          num_perm: int = 128, progress: Callable[[], None] | None = None) -> tuple[list[Row], DedupReport]:
    report = DedupReport(threshold=threshold, shingle_size=shingle_size, num_perm=num_perm, rows_in=len(rows))
    seen: dict[str, Row] = {}
    index = NearIndex(threshold, shingle_size, num_perm) if near else None
    kept: list[Row] = []
    for pos, row in enumerate(rows):
        messages = row.data["messages"]
        key = exact_key(messages)
        if key in seen:
            report.removed.append(_removed(row, seen[key], "exact"))
            report.exact_removed += 1
        else:
            seen[key] = row
            hit = None
            if index is not None:
                sh = shingles(messages, shingle_size)
                hit = index.query(sh)
            if hit is not None:
                # Indexed under the row it repeats, so a chain of small edits (a ~ b ~ c) collapses to `a` even
                # when `c` alone is no longer close to `a`.
                index.add(pos, sh, representative=index.representative[hit[0]])
                report.removed.append(_removed(row, rows[index.representative[hit[0]]], "near", round(hit[1], 4)))
                report.near_removed += 1
            else:
                if index is not None:
                    index.add(pos, sh)
                kept.append(row)
        if progress is not None:
            progress()
    report.rows_out = len(kept)
    return kept, report


def overlaps(train: Iterable[Row], val: Iterable[Row], *, threshold: float = 0.9,
             shingle_size: int = 5) -> list[Removed]:
    """Validation rows that repeat a training row exactly or nearly; `duplicate_of` is the training line."""
    train = list(train)
    exact: dict[str, Row] = {}
    index = NearIndex(threshold, shingle_size)
    for pos, row in enumerate(train):
        exact.setdefault(exact_key(row.data["messages"]), row)
        index.add(pos, shingles(row.data["messages"], shingle_size))
    found = []
    for row in val:
        key = exact_key(row.data["messages"])
        if key in exact:
            found.append(_removed(row, exact[key], "exact"))
            continue
        hit = index.query(shingles(row.data["messages"], shingle_size))
        if hit is not None:
            found.append(_removed(row, train[index.representative[hit[0]]], "near", round(hit[1], 4)))
    return found
