"""Finding benchmark questions inside training text: the leak rule of the Apollo paper, exactly and fast.

A text leaks a bench item when, after normalisation (``normalise``), it contains the item's whole question, or shares
at least ``min_chars`` (64) consecutive characters with it. Both checks are exact: every hash hit is verified by
comparing the characters, so there are no false positives, and the filters below cannot miss a real match, so there
are no false negatives either.

How it stays fast (numpy, no per-character Python):

- Every text is turned into code points and a polynomial prefix hash modulo 2^64, so the hash of any window is two
  lookups, a subtraction and a multiplication, for all windows at once.
- Long rule: the bench is indexed by the hash of *every* q-gram (q = min_chars / 2) of its questions and of every
  ``min_chars`` window. A shared run of ``min_chars`` characters contains a training q-gram that starts at a multiple
  of the stride ``s = min_chars - q + 1`` (any ``s`` consecutive positions hold one), so the training side only hashes
  the q-grams at those positions: one lookup per ``s`` characters. Each hit q-gram is then widened to the ``s``
  windows of ``min_chars`` characters that contain it, and these are looked up and compared with the bench text.
- Whole-question rule for questions shorter than ``min_chars``: each question is indexed by one *anchor*, the
  substring of ``ANCHOR`` characters (or the whole question if shorter) that is rarest in the bench; the training
  text is hashed at every position for each anchor length, and a hit is verified by comparing the whole question.
- Lookups go through a bit table on the hash's top bits (one gather, few false hits) and then a binary search in the
  sorted hashes.

Texts of one batch are joined with a NUL separator, which normalisation removes from every text, so no verified match
can cross from one text into the next.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_CHARS = 64  # the paper's rule (following Med-PaLM 2)
ANCHOR = 8  # anchor length for short questions: long enough to be rare, short enough for nearly every question
TINY_ANCHOR = 2  # anchor length for questions under ANCHOR characters (the whole question's hash filters the hits)
SEP = "\x00"
_BASE = 0x9E3779B97F4A7C15  # odd, so it has an inverse modulo 2^64
_INV = pow(_BASE, -1, 1 << 64)
_M64 = (1 << 64) - 1
_MIX = np.uint64(0xD6E8FEB86659FD93)  # odd: spreads a hash's low bits into its top bits


def normalise(text: str, fold_case: bool = False) -> str:
    """Whitespace runs (any Unicode whitespace, newlines included) become one space, the ends are stripped, NUL
    becomes a space; with ``fold_case`` the text is case-folded (``str.casefold``)."""
    if SEP in text:
        text = text.replace(SEP, " ")
    text = " ".join(text.split())
    return text.casefold() if fold_case else text


class _Powers:
    """B^i and B^-i modulo 2^64 for i < n, grown on demand (shared by every hash of the process)."""

    def __init__(self):
        self.pw = np.ones(1, np.uint64)
        self.ipw = np.ones(1, np.uint64)

    def get(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self.pw) < n:
            size = max(n, 2 * len(self.pw))
            self.pw = _power_table(_BASE, size)
            self.ipw = _power_table(_INV, size)
        return self.pw, self.ipw


def _power_table(base: int, n: int) -> np.ndarray:
    out = np.empty(n, np.uint64)
    out[0] = 1
    out[1:] = base
    return np.cumprod(out, dtype=np.uint64)  # wraps modulo 2^64, which is the arithmetic wanted


_POWERS = _Powers()


def _unique(x: np.ndarray, return_counts: bool = False):
    """Sorted unique values (np.unique's hash-based path is about 10x slower on millions of uint64 here)."""
    x = np.sort(x)
    first = np.flatnonzero(np.concatenate([[True], x[1:] != x[:-1]])) if len(x) else np.empty(0, np.int64)
    if not return_counts:
        return x[first]
    return x[first], np.diff(np.append(first, len(x)))


class HashedText:
    """One string's prefix hash: ``window(starts, m)`` is the hash of text[i:i+m] for every i in ``starts``."""

    def __init__(self, text: str):
        self.text = text
        codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4").astype(np.uint64)
        self.n = len(codes)
        pw, self.ipw = _POWERS.get(self.n + 1)
        self.prefix = np.zeros(self.n + 1, np.uint64)
        np.cumsum(codes * pw[: self.n], out=self.prefix[1:])

    def window(self, starts: np.ndarray, m: int) -> np.ndarray:
        return (self.prefix[starts + m] - self.prefix[starts]) * self.ipw[starts]

    def all_windows(self, m: int) -> np.ndarray:
        """Hashes of every window of length m (index = start)."""
        if self.n < m:
            return np.empty(0, np.uint64)
        return (self.prefix[m:] - self.prefix[: self.n - m + 1]) * self.ipw[: self.n - m + 1]


class HashSet:
    """Sorted 64-bit hashes with a payload per hash, and a bit table on the top bits to reject most misses fast."""

    def __init__(self, hashes: np.ndarray, payload: np.ndarray | None = None):
        order = np.argsort(hashes, kind="stable")
        self.hashes = hashes[order]
        self.payload = None if payload is None else payload[order]
        # at least 2^22 slots (4 MB): a small set (the short questions' anchors) then lets almost no miss through
        bits = int(min(30, max(22, np.ceil(np.log2(max(len(hashes), 1) * 16)))))
        self.shift = np.uint64(64 - bits)
        self.table = np.zeros(1 << bits, bool)
        self.table[self._slot(self.hashes)] = True

    def _slot(self, hashes: np.ndarray) -> np.ndarray:
        # The top bits of a short window's polynomial hash hardly depend on its first characters (c0 + c1*B: c0 only
        # reaches the low bits), so all 2-character windows ending in the same character would share a slot; one
        # multiplication by an odd constant carries the low bits up (Fibonacci hashing).
        return (hashes * _MIX) >> self.shift

    def __len__(self) -> int:
        return len(self.hashes)

    def nbytes(self) -> int:
        return self.hashes.nbytes + self.table.nbytes + (0 if self.payload is None else self.payload.nbytes)

    def find(self, hashes: np.ndarray) -> np.ndarray:
        """Indices (into ``hashes``) of the queries present in the set."""
        maybe = np.flatnonzero(self.table[self._slot(hashes)])
        if not len(maybe):
            return maybe
        q = hashes[maybe]
        order = np.argsort(q)  # sorted queries walk the sorted hashes in order: far fewer cache misses
        q, maybe = q[order], maybe[order]
        pos = np.minimum(np.searchsorted(self.hashes, q), len(self.hashes) - 1)
        return np.sort(maybe[self.hashes[pos] == q])

    def entries(self, h) -> np.ndarray:
        """The payloads of every entry with hash ``h`` (several: the same window in several items, or a collision)."""
        h = np.array([h], np.uint64)  # a Python int would make numpy convert the whole sorted array per call
        lo = int(np.searchsorted(self.hashes, h, side="left")[0])
        hi = int(np.searchsorted(self.hashes, h, side="right")[0])
        return self.payload[lo:hi]


@dataclass(frozen=True)
class Leak:
    text: int  # index of the text (in the list given to ``BenchIndex.scan``)
    item: int  # index of the bench question
    rule: str  # "overlap" (>= min_chars shared) or "whole_question" (a short question contained whole)
    start: int  # where the shared span starts in the normalised text
    span: str  # the shared characters (the maximal run around the match, or the question)


class BenchIndex:
    """The normalised bench questions, indexed for both rules. ``scan`` finds the first leak of each text."""

    def __init__(self, questions: list[str], min_chars: int = MIN_CHARS, min_question_chars: int = 1):
        """``min_question_chars``: shorter questions are not matched whole (1, the default, is the paper's rule)."""
        if min_chars < 1:
            raise ValueError(f"min_chars must be at least 1, got {min_chars}")
        self.questions = questions
        self.min_chars = min_chars
        self.q = min(min_chars, max(ANCHOR, min_chars // 2))
        self.stride = min_chars - self.q + 1
        long_ids = [i for i, t in enumerate(questions) if len(t) >= min_chars]
        short_ids = [i for i, t in enumerate(questions) if max(1, min_question_chars) <= len(t) < min_chars]
        self.n_long, self.n_short = len(long_ids), len(short_ids)
        self._index_long(long_ids)
        self._index_short(short_ids)

    def nbytes(self) -> int:
        return (self.qgrams.nbytes() + self.windows.nbytes()
                + sum(s.nbytes() for s in self.anchors.values()))

    def _index_long(self, ids: list[int]) -> None:
        m, q = self.min_chars, self.q
        lengths = np.array([len(self.questions[i]) for i in ids], np.int64)
        h = HashedText(SEP.join(self.questions[i] for i in ids))  # one numpy pass over the whole bench
        first = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]]).astype(np.int64)

        def inside(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            """Starts of the windows of n characters inside one question, with that question and the offset in it."""
            counts = np.maximum(lengths - n + 1, 0)
            owner = np.repeat(np.arange(len(ids)), counts)
            offset = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            return first[owner] + offset, owner, offset

        starts, _, _ = inside(q)
        self.qgrams = HashSet(_unique(h.window(starts, q)) if len(starts) else np.empty(0, np.uint64))
        starts, owner, offset = inside(m)
        hashes = h.window(starts, m) if len(starts) else np.empty(0, np.uint64)
        self.windows = HashSet(hashes, np.stack([np.array(ids, np.int64)[owner], offset], 1))

    def _index_short(self, ids: list[int]) -> None:
        # Anchor of a question: its rarest substring of ANCHOR characters in the bench (few false hits on common
        # phrases), or of TINY_ANCHOR characters for the very short ones; one all-position pass per anchor length.
        hashed = {i: HashedText(self.questions[i]) for i in ids}
        groups: dict[int, list[int]] = {}
        for i in ids:
            n = len(self.questions[i])
            groups.setdefault(ANCHOR if n >= ANCHOR else min(TINY_ANCHOR, n), []).append(i)
        self.anchors = {}
        for g, members in sorted(groups.items()):
            grams = [hashed[i].all_windows(g) for i in members]
            uniq, counts = _unique(np.concatenate(grams), return_counts=True)
            hs, pl = [], []
            for i, w in zip(members, grams):
                n = len(self.questions[i])
                k = int(np.argmin(counts[np.searchsorted(uniq, w)]))
                hs.append(w[k])
                # payload: question, anchor offset, length, the whole question's hash (checked before comparing)
                pl.append((i, k, n, int(hashed[i].all_windows(n)[0].view(np.int64))))
            self.anchors[g] = HashSet(np.array(hs, np.uint64), np.array(pl, np.int64).reshape(-1, 4))

    def scan(self, texts: list[str]) -> dict[int, Leak]:
        """The first leak (lowest position, then lowest question index) of each normalised text that has one."""
        joined = SEP.join(texts)
        if not joined:
            return {}
        h = HashedText(joined)
        starts = np.cumsum([0] + [len(t) + 1 for t in texts[:-1]])
        found: dict[int, Leak] = {}
        for leak in sorted(self._long_hits(h, starts) + self._short_hits(h, starts),
                           key=lambda x: (x.text, x.start, x.item)):
            found.setdefault(leak.text, leak)
        return found

    def _long_hits(self, h: HashedText, starts: np.ndarray) -> list[Leak]:
        m, q, s = self.min_chars, self.q, self.stride
        if h.n < m or not len(self.qgrams):
            return []
        sampled = np.arange(0, h.n - q + 1, s)
        cand = sampled[self.qgrams.find(h.window(sampled, q))]
        if not len(cand):
            return []
        # the windows of m characters that contain each hit q-gram start in [p + q - m, p]
        win = _unique(np.clip(cand[:, None] + np.arange(q - m, 1)[None, :], 0, h.n - m).ravel())
        wh = h.window(win, m)
        hit = self.windows.find(wh)
        win, wh = win[hit], wh[hit]
        if not len(win):
            return []
        owner = np.searchsorted(starts, win, side="right") - 1
        # A long shared run hits every window along it: verify each text's windows in order and stop at the first
        # that matches (nearly always its first: a hash hit that is not a real match needs a 64-bit collision).
        bounds = np.flatnonzero(np.concatenate([[True], owner[1:] != owner[:-1], [True]]))
        out = []
        for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            leak = next(filter(None, (self._verify(h, int(owner[lo]), starts, int(win[j]), wh[j])
                                      for j in range(lo, hi))), None)
            if leak is not None:
                out.append(leak)
        return out

    def _verify(self, h: HashedText, t: int, starts, a: int, wa) -> Leak | None:
        m = self.min_chars
        for item, off in self.windows.entries(wa).tolist():
            if h.text[a:a + m] == self.questions[item][off:off + m]:
                return self._overlap(h.text, t, starts, a, item, off)
        return None

    def _overlap(self, text: str, t: int, starts, a: int, item: int, off: int) -> Leak:
        bench, m = self.questions[item], self.min_chars
        lo, hi = a, a + m  # widen the verified window to the whole shared run, for the report
        while lo > 0 and off - (a - lo) > 0 and text[lo - 1] == bench[off - (a - lo) - 1]:
            lo -= 1
        while hi < len(text) and off + (hi - a) < len(bench) and text[hi] == bench[off + (hi - a)]:
            hi += 1
        return Leak(t, item, "overlap", lo - int(starts[t]), text[lo:hi])

    def _short_hits(self, h: HashedText, starts: np.ndarray) -> list[Leak]:
        out = []
        for n, anchors in self.anchors.items():
            hashes = h.all_windows(n)
            hits = anchors.find(hashes) if len(hashes) else hashes
            if not len(hits):
                continue
            # every (hit, question with that anchor) pair, then the whole question's hash at its would-be start
            lo = np.searchsorted(anchors.hashes, hashes[hits], side="left")
            cnt = np.searchsorted(anchors.hashes, hashes[hits], side="right") - lo
            entry = np.repeat(lo, cnt) + np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt)
            item, k, length, full = anchors.payload[entry].T
            a = np.repeat(hits, cnt) - k
            ok = (a >= 0) & (a + length <= h.n)
            a, item, length, full = a[ok], item[ok], length[ok], full[ok]
            same = h.window(a, length).view(np.int64) == full
            for a_, i_ in zip(a[same].tolist(), item[same].tolist()):
                question = self.questions[i_]
                if h.text.startswith(question, a_):  # exact: a hash equality alone could be a collision
                    t = int(np.searchsorted(starts, a_, side="right")) - 1
                    out.append(Leak(t, i_, "whole_question", a_ - int(starts[t]), question))
        return out
