"""Exact and near-duplicate removal, and the check that no conversation sits in both train and validation.

Exact: the whole conversation (roles and text, system prompt included) after Unicode NFKC, case folding and
whitespace collapsing. Near: datasketch MinHash + LSH over character 5-gram shingles of the user and assistant turns
(characters, not words, so Chinese and English are treated alike), each LSH candidate confirmed by the exact Jaccard
similarity of the shingle sets, so the result does not depend on LSH's false positives. The first occurrence is kept.
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
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def exact_key(messages: list[dict[str, Any]]) -> str:
    blob = "\x1e".join(f"{m.get('role')}\x1f{normalize(_content(m))}" for m in messages)
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
    """Rows seen so far, queryable for the most similar one at or above the threshold."""

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
        self.representative: dict[int, int] = {}  # line -> the kept line it stands for

    def _sketch(self, sh: set[str]):
        m = self._minhash(num_perm=self.num_perm, seed=1)
        m.update_batch(s.encode("utf-8") for s in sorted(sh))
        return m

    def query(self, sh: set[str]) -> tuple[int, float] | None:
        best: tuple[int, float] | None = None
        for line in sorted(self.lsh.query(self._sketch(sh))):
            sim = jaccard(sh, self.sets[line])
            if sim >= self.threshold and (best is None or sim > best[1]):
                best = (line, sim)
        return best

    def add(self, line: int, sh: set[str], representative: int | None = None) -> None:
        self.sets[line] = sh
        self.representative[line] = line if representative is None else representative
        self.lsh.insert(line, self._sketch(sh))


def dedup(rows: list[Row], *, near: bool = True, threshold: float = 0.9, shingle_size: int = 5,
          num_perm: int = 128, progress: Callable[[], None] | None = None) -> tuple[list[Row], DedupReport]:
    report = DedupReport(threshold=threshold, shingle_size=shingle_size, num_perm=num_perm, rows_in=len(rows))
    seen: dict[str, int] = {}
    index = NearIndex(threshold, shingle_size, num_perm) if near else None
    kept: list[Row] = []
    for row in rows:
        messages = row.data["messages"]
        key = exact_key(messages)
        if key in seen:
            report.removed.append(Removed(line=row.line, duplicate_of=seen[key], kind="exact"))
            report.exact_removed += 1
        else:
            seen[key] = row.line
            hit = None
            if index is not None:
                sh = shingles(messages, shingle_size)
                hit = index.query(sh)
            if hit is not None:
                # Indexed under the row it repeats, so a chain of small edits (a ~ b ~ c) collapses to `a` even
                # when `c` alone is no longer close to `a`.
                index.add(row.line, sh, representative=index.representative[hit[0]])
                report.removed.append(Removed(line=row.line, duplicate_of=index.representative[hit[0]], kind="near",
                                              similarity=round(hit[1], 4)))
                report.near_removed += 1
            else:
                if index is not None:
                    index.add(row.line, sh)
                kept.append(row)
        if progress is not None:
            progress()
    report.rows_out = len(kept)
    return kept, report


def overlaps(train: Iterable[Row], val: Iterable[Row], *, threshold: float = 0.9,
             shingle_size: int = 5) -> list[Removed]:
    """Validation rows that repeat a training row exactly or nearly; `duplicate_of` is the training line."""
    exact: dict[str, int] = {}
    index = NearIndex(threshold, shingle_size)
    for row in train:
        exact.setdefault(exact_key(row.data["messages"]), row.line)
        index.add(row.line, shingles(row.data["messages"], shingle_size))
    found = []
    for row in val:
        key = exact_key(row.data["messages"])
        if key in exact:
            found.append(Removed(line=row.line, duplicate_of=exact[key], kind="exact"))
            continue
        hit = index.query(shingles(row.data["messages"], shingle_size))
        if hit is not None:
            found.append(Removed(line=row.line, duplicate_of=index.representative[hit[0]], kind="near",
                                 similarity=round(hit[1], 4)))
    return found
