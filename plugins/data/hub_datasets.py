"""The hub datasets (simplestories, tinystories, fineweb) and `text` (your own files).

Each reads the hub dataset with `datasets` streaming, or local files in the same format with the same
code (`data_files`), and loads its published tokenizer from the hub (the local Hugging Face cache
first), unless a local `tokenizer` file is given.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from qtoy_core import (
    EmptySplitError,
    HFSource,
    HubTextDataset,
    MappedTokenizer,
    TextDataset,
    Tokenizer,
    TokenizerError,
    cached_tokenizer,
    hash_files,
    hub_file,
    resolve_data_files,
    train_bpe,
    url_file,
)

# The tokenizer files the projects publish (repo, file).
SIMPLESTORIES_TOKENIZERS = {
    4019: ("SimpleStories/SimpleStories-V2-5M", "tokenizer.json"),  # = simple_stories_train's simplestories-tokenizer.json
    4096: ("SimpleStories/SimpleStories-1.25M", "tokenizer.json"),  # = simplestories-4096.json (V1 models)
}
GPT2_TOKENIZER = ("openai-community/gpt2", "tokenizer.json")
# tinymodel (github.com/noanabeshima/tinymodel, MIT): its 10k TinyStories vocabulary as GPT-Neo ids.
TINYMODEL_MAP_URL = ("https://raw.githubusercontent.com/noanabeshima/tinymodel/"
                     "8021d1b4e3242e2aa0e38492bf24093679ac60cc/tiny_model/tokenization/ts_tok_ids_to_neo.pt")
TINYMODEL_MAP_SHA256 = "baf29e97fa377fa4b28f68d1498434e55ae32739218c16681987d1a36ca4b1b5"
TINYMODEL_SPECIALS = {"bos": "[BEGIN]", "eos": "[END]", "pad": "[PAD]", "unk": "[UNK]"}
GPT2_VOCAB = 50257


def _hub_source(repo: str, filename: str, path: str) -> str:
    """"hub:<repo>@<commit>/<file>", the commit read from the Hugging Face cache path (snapshots/<commit>/)."""
    parts = Path(path).parts
    commit = parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None
    return f"hub:{repo}{'@' + commit if commit else ''}/{filename}"


def _tokenizer_hint() -> str:
    return "Pass a local tokenizer.json with --tokenizer (e.g. `--tokenizer path/to/tokenizer.json`)."


class SimpleStoriesDataset(HubTextDataset):
    """SimpleStories: lowercasing WordPiece, [EOS] between stories, [UNK] for unknown words."""

    def load_tokenizer(self) -> Tokenizer:
        repo, filename = SIMPLESTORIES_TOKENIZERS[self.config.tokenizer_vocab]
        path = hub_file(repo, filename, dataset=self.name, hint=_tokenizer_hint())
        tok = Tokenizer.from_file(path)
        tok.source = _hub_source(repo, filename, path)
        if tok.vocab_size != self.config.tokenizer_vocab:
            warnings.warn(f"Dataset {self.name!r}: {repo}/{filename} has {tok.vocab_size} tokens, not the "
                          f"{self.config.tokenizer_vocab} expected; using it as it is.", stacklevel=2)
        return tok


class FineWebDataset(HubTextDataset):
    """FineWeb sample-10BT with the GPT-2 BPE (<|endoftext|> between documents)."""

    def load_tokenizer(self) -> Tokenizer:
        repo, filename = GPT2_TOKENIZER
        path = hub_file(repo, filename, dataset=self.name, hint=_tokenizer_hint())
        tok = Tokenizer.from_file(path)
        tok.source = _hub_source(repo, filename, path)
        return tok


class TinyStoriesDataset(HubTextDataset):
    """TinyStories with tinymodel's tokenizer: GPT-Neo BPE restricted to the 10k most frequent tokens.

    Unlike tinymodel, documents with rare characters are kept: pieces outside the 10k become [UNK]
    (the stream counts them). [BEGIN] starts and [END] ends every story.
    """

    def load_tokenizer(self) -> Tokenizer:
        c = self.config
        hint = ("Pass local files with the dataset options base_tokenizer=<GPT-2 tokenizer.json> and "
                "id_maps=<folder with tinymodel's ts_tok_ids_to_neo.pt>, or a ready tokenizer with --tokenizer.")
        if c.base_tokenizer:
            base_path, base_source = c.base_tokenizer, c.base_tokenizer
        else:
            repo, filename = GPT2_TOKENIZER
            base_path = hub_file(repo, filename, dataset=self.name, hint=hint)
            base_source = _hub_source(repo, filename, base_path)
        if c.id_maps:
            map_path = _find_map(c.id_maps)
        else:
            map_path = url_file(TINYMODEL_MAP_URL, "tinymodel_ts_tok_ids_to_neo.pt", dataset=self.name, hint=hint,
                                sha256=TINYMODEL_MAP_SHA256)
        tok = tinymodel_tokenizer(base_path, map_path)
        tok.source = f"tinymodel({base_source}, {map_path})"
        return tok


def _find_map(path: str) -> str:
    p = Path(path).expanduser()
    if p.is_dir():
        for name in ("ts_tok_ids_to_neo.pt", "tinymodel_ts_tok_ids_to_neo.pt", "neo_tok_ids_to_ts.pt",
                     "tinymodel_neo_tok_ids_to_ts.pt"):
            if (p / name).is_file():
                return str(p / name)
        raise TokenizerError(f"The folder {path!r} holds none of tinymodel's id maps (ts_tok_ids_to_neo.pt or "
                             f"tinymodel_ts_tok_ids_to_neo.pt).")
    if not p.is_file():
        raise TokenizerError(f"The tinymodel id map {path!r} does not exist.")
    return str(p)


def tinymodel_tokenizer(base_tokenizer: str, id_map: str) -> MappedTokenizer:
    """tinymodel's tokenizer from a GPT-2/GPT-Neo tokenizer.json and one of its id maps (.pt): either
    TinyStories id -> base id (10k entries) or base id -> TinyStories id (one per base id)."""
    import torch

    base = Tokenizer.from_file(base_tokenizer).backend
    base.add_special_tokens([TINYMODEL_SPECIALS[r] for r in ("bos", "eos", "pad", "unk")])
    ids = [base.token_to_id(TINYMODEL_SPECIALS[r]) for r in ("bos", "eos", "pad", "unk")]
    base_size = base.get_vocab_size(with_added_tokens=True)
    try:
        table = torch.load(id_map, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TokenizerError(f"Cannot read the tinymodel id map {id_map!r}: {exc}") from None
    table = [int(i) for i in (table.tolist() if hasattr(table, "tolist") else table)]
    if len(table) == base_size:  # base -> TinyStories: invert it (unknown pieces all map to [UNK])
        unk_ts = table[ids[3]]
        size = max(table) + 1
        to_base = [-1] * size
        for neo, ts in enumerate(table):
            if ts != unk_ts or neo == ids[3]:
                to_base[ts] = neo
        if -1 in to_base:
            raise TokenizerError(f"The id map {id_map!r} does not cover the ids 0..{size - 1}.")
    else:
        to_base = table
    if to_base[-4:] != ids:
        raise TokenizerError(
            f"The id map {id_map!r} does not match the base tokenizer {base_tokenizer!r}: it expects [BEGIN] [END] "
            f"[PAD] [UNK] at base ids {to_base[-4:]}, the base tokenizer has them at {ids}. tinymodel's maps need "
            f"the GPT-2/GPT-Neo BPE ({GPT2_VOCAB} tokens).")
    return MappedTokenizer(base, to_base, normalizer="tinymodel", specials=TINYMODEL_SPECIALS)


class TextFilesDataset(TextDataset):
    """Your own files; without a tokenizer, a byte-level BPE trained on them and cached by content hash."""

    def make_source(self) -> HFSource:
        c = self.config
        local = resolve_data_files(c.data_files, dataset=self.name, text_split=c.text_split)
        return HFSource(dataset=self.name, column=c.column, local=local,
                        hint="Check the paths given with --data-files.")

    def load_tokenizer(self) -> Tokenizer:
        c = self.config
        local = self.source().local
        key = (f"text-{hash_files(local.files)}-{local.builder}-{c.column}-{local.text_split}-bpe{c.vocab_size}"
               f"-c{c.tokenizer_train_chars}-v{c.val_fraction}-s{c.split_seed}")

        def build():
            seen = []
            backend = train_bpe(self._training_texts(seen), vocab_size=c.vocab_size)
            if not seen:
                raise EmptySplitError(f"Dataset {self.name!r}: no documents in the train split of "
                                      f"{', '.join(local.files[:3])} to train a tokenizer on.")
            return backend

        return cached_tokenizer(key, build, source=f"trained on {len(local.files)} file(s) ({key})")

    def _training_texts(self, seen: list):
        budget = self.config.tokenizer_train_chars
        for text in self.documents("train"):
            if not seen:
                seen.append(True)
            yield text[:budget]
            budget -= len(text)
            if budget <= 0:
                return


__all__ = ["FineWebDataset", "SimpleStoriesDataset", "TextFilesDataset", "TinyStoriesDataset", "tinymodel_tokenizer"]
