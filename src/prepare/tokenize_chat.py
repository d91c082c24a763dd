"""Turning a conversation into token ids and loss spans, in the model's chat format.

A document is ``fmt.render(turns)``: prefix + user + q1 + assistant + a1 + end + sep + user + q2 + ... (the same
strings step 1's prompts use, BOS included where the format has one, so training and evaluation agree). The loss is on
each answer and the ``end`` string after it (the model learns to stop); the prefix, user turns, role strings and
separators get no loss.

The spans are computed on characters first (exact by construction), then mapped to tokens with the offsets of one
tokenization of the whole document: a token is a target when it starts inside an answer span. If BPE merged across a
span boundary (a token that starts before the boundary and ends after it, e.g. ``":The"`` in ``"Assistant:The"``),
no token boundary exists there; the document is then tokenized in pieces cut at those boundaries, which is also
what the model sees at inference (the prompt ends at the assistant string, the answer is generated after it). Either
way, decoding the target tokens of a turn gives exactly ``answer + end``; the reference instead masked a fixed number
of tokens of a separate ``"\\nAssistant:"`` encoding, which shifts when BPE merges at the boundary.

Raw pretraining text (``*_text`` sources) has no chat format: a document is ``[BOS] + text + EOS`` with the loss on
every token but the BOS (``text_framing``: BOS only where the tokenizer itself puts one before plain text, as
Llama-3 and Gemma do and Qwen2 and SmolLM2 do not; EOS = the tokenizer's EOS, so the model learns where documents
end). A document longer than max_len is cut into consecutive pieces of max_len tokens (the last one shorter), each
a document of its own with the loss on all its tokens, rather than truncated: nothing of the text is lost.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from src.common.chat_formats import ChatFormat, adds_bos

TOKENIZED_SCHEMA = pa.schema([
    ("file", pa.int32()),
    ("index", pa.string()),
    ("source_id", pa.int32()),
    ("input_ids", pa.list_(pa.int32())),  # truncated to max_len
    ("label_spans", pa.list_(pa.int32())),  # flat [start, end) token pairs, one per answer, after truncation
    ("full_length", pa.int32()),  # tokens before truncation
    ("boundary_split", pa.bool_()),  # tokenized in pieces because BPE merged across a span boundary
    ("piece", pa.int32()),  # raw text cut at max_len: the piece's number in its document (else 0)
])


def text_framing(tokenizer) -> tuple[int | None, int]:
    """(BOS id or None, EOS id) around a raw text document: BOS only where the tokenizer adds one to plain text."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token: raw text documents need one to mark their end")
    return (tokenizer.bos_token_id if adds_bos(tokenizer) else None), tokenizer.eos_token_id


def render_with_spans(fmt: ChatFormat, turns: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered document and the character span [start, end) of every ``answer + end``."""
    parts, spans, pos = [fmt.prefix], [], len(fmt.prefix)
    for i in range(0, len(turns), 2):
        head = (fmt.sep if i else "") + fmt.user + turns[i] + fmt.assistant
        answer = turns[i + 1] + fmt.end
        parts += [head, answer]
        pos += len(head)
        spans.append((pos, pos + len(answer)))
        pos += len(answer)
    return "".join(parts), spans


class ChatEncoder:
    """Callable for ``Dataset.map(batched=True)`` on an Arrow-formatted record table (picklable for num_proc)."""

    def __init__(self, tokenizer, fmt: ChatFormat, max_len: int):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("step 2 needs a fast (Rust) tokenizer: loss spans come from its character offsets")
        self.backend = tokenizer.backend_tokenizer
        self.fmt, self.max_len = fmt, max_len
        try:
            self.framing = text_framing(tokenizer)
        except ValueError as e:  # only an error if a text document comes
            self.framing = e

    def _encode(self, texts: list[str]):
        return self.backend.encode_batch(texts, add_special_tokens=False)

    def encode(self, turns_batch: list[list[str]]) -> list[tuple[np.ndarray, np.ndarray, int, bool]]:
        """For each conversation: (ids int32, token spans int32 [k, 2], length before truncation, split?)."""
        rendered = [render_with_spans(self.fmt, t) for t in turns_batch]
        out = []
        for (text, spans), enc in zip(rendered, self._encode([t for t, _ in rendered])):
            ids = np.asarray(enc.ids, dtype=np.int32)
            offs = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
            cuts = sorted({b for span in spans for b in span
                           if np.any((offs[:, 0] < b) & (offs[:, 1] > b))})
            if cuts:
                ids, offs = self._encode_pieces(text, cuts)
            starts = offs[:, 0]
            tok_spans = []
            for a, b in spans:
                inside = np.flatnonzero((starts >= a) & (starts < b))
                if len(inside) == 0 or inside[-1] - inside[0] + 1 != len(inside):
                    raise RuntimeError(f"cannot map the answer span {a}:{b} onto tokens of {text[:80]!r}")
                tok_spans.append((inside[0], inside[-1] + 1))
            out.append((ids, np.asarray(tok_spans, dtype=np.int32).reshape(-1, 2), len(ids), bool(cuts)))
        return out

    def _encode_pieces(self, text: str, cuts: list[int]) -> tuple[np.ndarray, np.ndarray]:
        bounds = [0, *cuts, len(text)]
        pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
        ids, offs = [], []
        for start, enc in zip(bounds, self._encode(pieces)):
            ids.append(np.asarray(enc.ids, dtype=np.int32))
            offs.append(np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2) + start)
        return np.concatenate(ids), np.concatenate(offs)

    def truncate(self, ids: np.ndarray, spans: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(ids) <= self.max_len:
            return ids, spans
        spans = spans[spans[:, 0] < self.max_len].copy()
        spans[:, 1] = np.minimum(spans[:, 1], self.max_len)
        return ids[:self.max_len], spans

    def encode_text(self, texts: list[str]) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """For each raw document: its pieces of at most max_len tokens, as (ids int32, token spans int32 [1, 2])."""
        if isinstance(self.framing, Exception):
            raise self.framing
        bos, eos = self.framing
        out = []
        for enc in self._encode(texts):
            ids = np.asarray(([bos] if bos is not None else []) + enc.ids + [eos], dtype=np.int32)
            pieces = []
            for a in range(0, len(ids), self.max_len):
                piece = ids[a:a + self.max_len]
                start = 1 if a == 0 and bos is not None else 0  # the BOS is not a target
                pieces.append((piece, np.asarray([[start, len(piece)]], dtype=np.int32)))
            out.append(pieces)
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        turns = batch.column("turns").to_pylist()
        names = batch.column_names  # a table without is_text holds conversations only
        is_text = batch.column("is_text").to_pylist() if "is_text" in names else [False] * batch.num_rows
        chat = iter(self.encode([t for t, x in zip(turns, is_text) if not x]))
        text = iter(self.encode_text([t[0] for t, x in zip(turns, is_text) if x]))
        rows, ids_list, span_list, full, split, piece = [], [], [], [], [], []
        for r, x in enumerate(is_text):
            if x:  # one output row per piece
                for k, (ids, spans) in enumerate(next(text)):
                    rows.append(r)
                    ids_list.append(ids)
                    span_list.append(spans.reshape(-1))
                    full.append(len(ids))
                    split.append(False)
                    piece.append(k)
                continue
            ids, spans, n, cut = next(chat)
            ids, spans = self.truncate(ids, spans)
            rows.append(r)
            ids_list.append(ids)
            span_list.append(spans.reshape(-1))
            full.append(n)
            split.append(cut)
            piece.append(0)
        take = pa.array(rows, pa.int32())
        return pa.table({
            "file": batch.column("file").take(take), "index": batch.column("index").take(take),
            "source_id": batch.column("source_id").take(take),
            "input_ids": _list_array(ids_list), "label_spans": _list_array(span_list),
            "full_length": pa.array(full, pa.int32()), "boundary_split": pa.array(split, pa.bool_()),
            "piece": pa.array(piece, pa.int32()),
        }, schema=TOKENIZED_SCHEMA)


def _list_array(arrays: list[np.ndarray]) -> pa.ListArray:
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(np.int32, copy=False)))
