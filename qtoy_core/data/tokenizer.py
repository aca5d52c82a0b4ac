"""`Tokenizer`: one interface over every tokenizer qtoy uses (a `tokenizers.Tokenizer` underneath).

    encode(text) -> ids          decode(ids) -> text          encode_batch(texts) -> [ids]
    enc(texts) -> (ids, mask)    dec(ids) -> [text]           vocab_size, bos_id/eos_id/pad_id/unk_id

Documents are encoded without the tokenizer's own post-processing (no [EOS] appended by a template):
the data pipeline places separators itself. `MappedTokenizer` is a tokenizer whose ids are a
re-numbered subset of a base tokenizer's (the tinymodel 10k TinyStories vocabulary over GPT-Neo's BPE);
pieces outside the subset become [UNK].

`train_bpe` trains a byte-level BPE deterministically; `cached_tokenizer` trains once and keeps the
result under qtoy's cache folder.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from ..run_files import write_atomic
from .cache import cache_dir
from .errors import TokenizerError

if TYPE_CHECKING:
    import tokenizers
    import torch

END_OF_TEXT = "<|endoftext|>"
MAPPED_FORMAT = "qtoy-mapped-tokenizer/1"
_AUTO = object()

# Token strings recognised as special tokens. "Safe" ones look special enough to be taken from the
# vocabulary as well; the others only count when the file declares them as added tokens.
_SPECIALS = {
    "bos": (("[BEGIN]", "[BOS]", "<|bos|>", "<|begin_of_text|>", "<|startoftext|>"), ("<s>", "<bos>")),
    "eos": (("[EOS]", "[END]", END_OF_TEXT, "<|eos|>", "<|end_of_text|>"), ("</s>", "<eos>")),
    "pad": (("[PAD]", "<|pad|>", "<|padding|>"), ("<pad>",)),
    "unk": (("[UNK]", "<|unk|>"), ("<unk>",)),
}


class Tokenizer:
    """A `tokenizers.Tokenizer` with qtoy's interface and its special-token ids (None where absent).

    Special tokens are found by their usual spellings ([EOS], <|endoftext|>, [UNK], [PAD], [BEGIN], ...);
    pass `bos=`, `eos=`, `pad=`, `unk=` (a token string, an id, or None) to override.
    """

    def __init__(self, tokenizer: "tokenizers.Tokenizer", *, bos: Any = _AUTO, eos: Any = _AUTO,
                 pad: Any = _AUTO, unk: Any = _AUTO, source: str | None = None):
        self.backend = tokenizer
        self.source = source
        self._json: str | None = None
        found = self._find_specials() if any(v is _AUTO for v in (bos, eos, pad, unk)) else {}
        self.bos_id = self._special("bos", bos, found)
        self.eos_id = self._special("eos", eos, found)
        self.pad_id = self._special("pad", pad, found)
        self.unk_id = self._special("unk", unk, found)
        self._fast = hasattr(tokenizer, "encode_batch_fast")

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path, **specials: Any) -> "Tokenizer":
        """Load a tokenizer.json (or a file written by `MappedTokenizer.save`)."""
        path = Path(path).expanduser()
        if not path.is_file():
            hint = " (it is a folder: pass the tokenizer.json inside it)" if path.is_dir() else ""
            raise TokenizerError(f"Tokenizer file {str(path)!r} does not exist{hint}. Pass the path of a "
                                 f"tokenizers JSON file (tokenizer.json).")
        try:
            text = path.read_text(encoding="utf-8")
            data = json.loads(text)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TokenizerError(f"Tokenizer file {str(path)!r} is not a tokenizers JSON file ({exc}).") from None
        if isinstance(data, dict) and data.get("format") == MAPPED_FORMAT:
            return MappedTokenizer.from_dict(data, source=str(path))
        return cls(_backend_from_str(text, str(path)), source=str(path), **specials)

    @classmethod
    def from_str(cls, text: str, **specials: Any) -> "Tokenizer":
        data = json.loads(text)
        if isinstance(data, dict) and data.get("format") == MAPPED_FORMAT:
            return MappedTokenizer.from_dict(data)
        return cls(_backend_from_str(text, "<string>"), **specials)

    def _find_specials(self) -> dict[str, int]:
        data = json.loads(self.to_str())
        added = {t["content"]: t["id"] for t in data.get("added_tokens") or [] if t.get("special", True)}
        found: dict[str, int] = {}
        for role, (safe, added_only) in _SPECIALS.items():
            for token in safe + added_only:
                tid = added.get(token)
                if tid is None and token in safe:
                    tid = self.backend.token_to_id(token)
                if tid is not None:
                    found[role] = tid
                    break
        unk = (data.get("model") or {}).get("unk_token")
        if "unk" not in found and unk is not None and self.backend.token_to_id(unk) is not None:
            found["unk"] = self.backend.token_to_id(unk)
        return found

    def _special(self, role: str, value: Any, found: dict[str, int]) -> int | None:
        if value is _AUTO:
            return found.get(role)
        if value is None or isinstance(value, int):
            return value
        tid = self.backend.token_to_id(str(value))
        if tid is None:
            raise TokenizerError(f"The tokenizer has no token {value!r} to use as its {role} token.")
        return tid

    # -- basic interface --------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def separator_id(self) -> int:
        """The end-of-text token placed after every document (eos, else bos)."""
        sep = self.eos_id if self.eos_id is not None else self.bos_id
        if sep is None:
            raise TokenizerError(
                f"The tokenizer{self._named()} has no end-of-text token ([EOS], <|endoftext|>, [END] or "
                f"</s>), which qtoy places between documents. Use a tokenizer with one, or name it: "
                f"Tokenizer(..., eos='<token>').")
        return sep

    @property
    def padding_id(self) -> int:
        """The id used to right-pad rows: pad, else eos, else 0 (the attention mask marks padding)."""
        for tid in (self.pad_id, self.eos_id, 0):
            if tid is not None:
                return tid
        return 0

    def normalize(self, text: str) -> str:
        """Text as the tokenizer sees it (identity here; MappedTokenizer cleans text like tinymodel)."""
        return text

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(self.normalize(text), add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = [self.normalize(t) for t in texts]
        if self._fast:
            return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]], str]:
        """(ids, character offsets of each token in the normalized text, the normalized text)."""
        norm = self.normalize(text)
        enc = self.backend.encode(norm, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets], norm

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(_id_list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    # -- batches as tensors (the tinymodel-style interface) ---------------------------------------
    def enc(self, texts: str | Sequence[str], *, max_length: int | None = None, add_bos: bool = False,
            add_eos: bool = False) -> tuple["torch.Tensor", "torch.Tensor"]:
        """Encode texts to (ids, attention_mask): LongTensors (batch, longest), right-padded."""
        import torch

        if isinstance(texts, str):
            texts = [texts]
        rows = self.encode_batch(list(texts))
        if add_bos:
            if self.bos_id is None:
                raise TokenizerError(f"add_bos=True but the tokenizer{self._named()} has no bos token.")
            rows = [[self.bos_id] + r for r in rows]
        if add_eos:
            rows = [r + [self.separator_id] for r in rows]
        if max_length is not None:
            rows = [r[:max_length] for r in rows]
        width = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), width), self.padding_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
                mask[i, : len(r)] = 1
        return ids, mask

    def dec(self, ids: Any, attention_mask: Any = None, *, skip_special_tokens: bool = False) -> list[str]:
        """Decode a batch (2-D tensor/array/list) to one string per row; a 1-D input is one row.

        With `attention_mask`, positions where it is 0 (padding) are left out.
        """
        rows = _rows(ids)
        masks = _rows(attention_mask) if attention_mask is not None else None
        out = []
        for i, row in enumerate(rows):
            if masks is not None:
                row = [t for t, m in zip(row, masks[i]) if m]
            out.append(self.decode(row, skip_special_tokens=skip_special_tokens))
        return out

    # -- identity -------------------------------------------------------------------------------
    def to_str(self) -> str:
        if self._json is None:
            self._json = self.backend.to_str()
        return self._json

    def save(self, path: str | Path) -> None:
        write_atomic(path, self.to_str().encode("utf-8"))

    def fingerprint(self) -> str:
        """A stable hash (16 hex digits) of the tokenizer's JSON: equal fingerprints, equal tokenizer."""
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = hashlib.sha256(self.to_str().encode("utf-8")).hexdigest()[:16]
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint(), "vocab_size": self.vocab_size, "source": self.source,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id, "unk_id": self.unk_id}

    def _named(self) -> str:
        return f" ({self.source})" if self.source else ""

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, "
                f"pad={self.pad_id}, unk={self.unk_id}, source={self.source!r})")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["backend"] = self.backend.to_str()
        state["_json"] = None
        state["_fingerprint"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        state["backend"] = _backend_from_str(state["backend"], state.get("source") or "<pickle>")
        self.__dict__.update(state)


# -- tinymodel: a 10k subset of GPT-Neo's BPE ------------------------------------------------------
_MOJIBAKE = re.compile("\u00e2\u20ac(.)")  # UTF-8 punctuation read as cp1252: â€™ for ’
_FOLD = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
                       "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2033": '"', "\u00ab": '"', "\u00bb": '"',
                       "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2015": "-",
                       "\u2026": "...", "\u00a0": " ", "\u200a": " ", "\u2009": " ", "\u200b": "",
                       "\t": "  "})


def _fix_mojibake(match: re.Match) -> str:
    try:
        return ("\u00e2\u20ac" + match.group(1)).encode("cp1252").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return '"'


def tinymodel_clean(text: str) -> str:
    """tinymodel's text cleaning, without its unidecode dependency: fix the â€™-style mojibake in
    TinyStories, fold typographic quotes/dashes/ellipses to ASCII, strip accents, tabs to two spaces,
    drop trailing spaces, collapse runs of blank lines and of spaces."""
    if "\u00e2" in text:
        text = _MOJIBAKE.sub(_fix_mojibake, text)
    text = text.translate(_FOLD)
    if not text.isascii():
        text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
        text = unicodedata.normalize("NFC", text)
    text = re.sub(r"[ \t\r\f\v]+\n", "\n", text)
    text = re.sub(r"\n\n+", "\n", text)
    return re.sub(r" +", " ", text)


NORMALIZERS: dict[str, Callable[[str], str]] = {"none": lambda t: t, "tinymodel": tinymodel_clean}


class MappedTokenizer(Tokenizer):
    """A base tokenizer whose ids are mapped onto a smaller vocabulary: id i here is base id
    `to_base[i]`; base pieces outside the subset become the [UNK] id (counted, never dropped)."""

    def __init__(self, base: "tokenizers.Tokenizer", to_base: Sequence[int], *, normalizer: str = "none",
                 specials: dict[str, str] | None = None, source: str | None = None):
        self.to_base = [int(i) for i in to_base]
        base_size = base.get_vocab_size(with_added_tokens=True)
        if max(self.to_base) >= base_size:
            raise TokenizerError(f"The id map refers to base id {max(self.to_base)} but the base tokenizer "
                                 f"has only {base_size} ids (it lacks the special tokens the map expects).")
        if normalizer not in NORMALIZERS:
            raise TokenizerError(f"Unknown text normalizer {normalizer!r}; known: {', '.join(NORMALIZERS)}.")
        self.normalizer = normalizer
        self._norm = NORMALIZERS[normalizer]
        self.specials = dict(specials or {})
        self.from_base = [-1] * base_size
        for i, b in enumerate(self.to_base):
            self.from_base[b] = i
        super().__init__(base, source=source, bos=None, eos=None, pad=None, unk=None)
        for role in ("bos", "eos", "pad", "unk"):
            token = self.specials.get(role)
            if token is not None:
                bid = base.token_to_id(token)
                mapped = self.from_base[bid] if bid is not None else -1
                if mapped < 0:
                    raise TokenizerError(f"The id map has no id for the {role} token {token!r}.")
                setattr(self, f"{role}_id", mapped)
        if self.unk_id is None:
            raise TokenizerError("A mapped tokenizer needs an unk token for pieces outside its vocabulary.")
        unk = self.unk_id
        self.from_base = [unk if m < 0 else m for m in self.from_base]

    @classmethod
    def from_dict(cls, data: dict, *, source: str | None = None) -> "MappedTokenizer":
        try:
            base = _backend_from_str(json.dumps(data["base"]), source or "<mapped tokenizer>")
            return cls(base, data["to_base"], normalizer=data.get("normalizer", "none"),
                       specials=data.get("specials"), source=source or data.get("source"))
        except KeyError as exc:
            raise TokenizerError(f"Mapped tokenizer file {source!r} lacks the key {exc}.") from None

    @property
    def vocab_size(self) -> int:
        return len(self.to_base)

    def normalize(self, text: str) -> str:
        return self._norm(text)

    def _map(self, ids: list[int]) -> list[int]:
        m = self.from_base
        return [m[i] for i in ids]

    def encode(self, text: str) -> list[int]:
        return self._map(super().encode(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        m = self.from_base
        return [[m[i] for i in ids] for ids in super().encode_batch(texts)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]], str]:
        ids, offsets, norm = super().encode_with_offsets(text)
        return self._map(ids), offsets, norm

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        base = self.to_base
        return self.backend.decode([base[i] for i in _id_list(ids)], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(self.to_base[int(token_id)])

    def to_str(self) -> str:
        if self._json is None:
            self._json = json.dumps({"format": MAPPED_FORMAT, "normalizer": self.normalizer,
                                     "specials": self.specials, "to_base": self.to_base,
                                     "base": json.loads(self.backend.to_str())}, ensure_ascii=False)
        return self._json

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._norm = NORMALIZERS[self.normalizer]


# -- training --------------------------------------------------------------------------------------
def train_bpe(texts: Iterable[str], *, vocab_size: int = 4096, special_tokens: Sequence[str] = (END_OF_TEXT,),
              fill_to_size: bool = True) -> "tokenizers.Tokenizer":
    """Train a byte-level BPE (GPT-2 style pre-tokenizer, no prefix space) on `texts`, in order.

    Deterministic: the same texts give the same file, byte for byte. With `fill_to_size`, a corpus too
    small for `vocab_size` merges gets reserved tokens `<|reserved_N|>` so the size is exactly
    `vocab_size` (models configured for that size then fit).
    """
    from tokenizers import Tokenizer as _Tokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = _Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer=trainer)
    size = tk.get_vocab_size(with_added_tokens=True)
    if fill_to_size and size < vocab_size:
        tk.add_special_tokens([f"<|reserved_{i}|>" for i in range(vocab_size - size)])
    return tk


def cached_tokenizer(key: str, build: Callable[[], "tokenizers.Tokenizer"], *, source: str | None = None) -> Tokenizer:
    """The tokenizer cached under `<cache>/tokenizers/<key>.json`, built (and cached) on first use."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", key)
    path = cache_dir("tokenizers") / f"{safe}.json"
    tok = None
    if path.is_file():
        try:
            tok = Tokenizer.from_file(path)
        except TokenizerError:
            tok = None  # a damaged cache file: rebuild it
    if tok is None:
        backend = build()
        write_atomic(path, backend.to_str().encode("utf-8"))
        tok = Tokenizer.from_file(path)
    tok.source = source or str(path)
    tok.cache_path = str(path)
    return tok


def _backend_from_str(text: str, where: str) -> "tokenizers.Tokenizer":
    from tokenizers import Tokenizer as _Tokenizer

    try:
        return _Tokenizer.from_str(text)
    except Exception as exc:  # the Rust side raises plain Exception subclasses
        raise TokenizerError(f"Tokenizer {where!r} could not be read by the tokenizers library: {exc}. Pass a "
                             f"tokenizer.json written by the tokenizers library (e.g. a model's tokenizer.json "
                             f"from the Hugging Face hub).") from None


def _id_list(ids: Any) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


def _rows(ids: Any) -> list[list[int]]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [[ids]]
    ids = list(ids)
    if ids and not isinstance(ids[0], (list, tuple)) and not hasattr(ids[0], "tolist"):
        return [[int(i) for i in ids]]
    return [_id_list(r) for r in ids]
