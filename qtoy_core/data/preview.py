"""What `qtoy data preview` shows, as plain data: sample documents cut at token boundaries, and
statistics of a split (tokens per document, vocabulary coverage, unknown-token rate, and for the
synthetic dataset the corpus entropy per token)."""

from __future__ import annotations

import statistics
from itertools import islice
from typing import Any

from .dataset import TextDataset


def token_pieces(dataset: TextDataset, text: str) -> list[dict[str, Any]]:
    """The tokens of `text` as {"id", "text" (the characters it covers), "unk"}; characters no token
    covers (spaces a WordPiece tokenizer drops) are pieces with id None."""
    tok = dataset.tokenizer()
    ids, offsets, norm = tok.encode_with_offsets(text)
    pieces: list[dict[str, Any]] = []
    cursor = 0
    for tid, (start, end) in zip(ids, offsets):
        if start > cursor:
            pieces.append({"id": None, "text": norm[cursor:start], "unk": False})
        piece = norm[start:end] if end > start else (tok.id_to_token(tid) or "")
        pieces.append({"id": tid, "text": piece, "unk": tid == tok.unk_id})
        cursor = max(cursor, end)
    if cursor < len(norm):
        pieces.append({"id": None, "text": norm[cursor:], "unk": False})
    return pieces


def sample_documents(dataset: TextDataset, n: int = 3, split: str = "train") -> list[dict[str, Any]]:
    """The first `n` documents of `split` (source order) with their token pieces."""
    return [{"key": key, "text": text, "pieces": token_pieces(dataset, text)}
            for key, text in islice(dataset.records(split), n)]


def split_stats(dataset: TextDataset, n_docs: int = 200, split: str = "train") -> dict[str, Any]:
    """Statistics over the first `n_docs` documents of `split`."""
    tok = dataset.tokenizer()
    texts = [text for _, text in islice(dataset.records(split), n_docs)]
    lengths: list[int] = []
    seen: set[int] = set()
    unknown = chars = 0
    for i in range(0, len(texts), 256):
        for ids in tok.encode_batch(texts[i:i + 256]):
            lengths.append(len(ids))
            seen.update(ids)
            if tok.unk_id is not None:
                unknown += ids.count(tok.unk_id)
    chars = sum(len(t) for t in texts)
    tokens = sum(lengths)
    stats: dict[str, Any] = {
        "dataset": dataset.name, "split": split, "documents": len(texts), "tokens": tokens,
        "tokens_per_document_mean": tokens / len(texts) if texts else 0.0,
        "tokens_per_document_median": statistics.median(lengths) if lengths else 0,
        "tokens_per_document_min": min(lengths, default=0), "tokens_per_document_max": max(lengths, default=0),
        "chars_per_token": chars / tokens if tokens else 0.0,
        "vocab_size": tok.vocab_size, "distinct_tokens": len(seen),
        "vocab_coverage": len(seen) / tok.vocab_size if tok.vocab_size else 0.0,
        "unknown_tokens": unknown if tok.unk_id is not None else None,
        "unknown_rate": (unknown / tokens if tokens else 0.0) if tok.unk_id is not None else None,
        "tokenizer": tok.describe(),
    }
    entropy = getattr(dataset, "entropy_stats", None)
    if entropy is not None and texts and not getattr(dataset.config, "data_files", None):
        stats["entropy"] = entropy(n_docs=len(texts), split=split)
    return stats
