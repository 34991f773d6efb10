"""Tokenizers for generation: the checkpoint's ``tokenizer.json`` (via ``tokenizers``), or raw
UTF-8 bytes for the built-in demo model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol


class TextTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """Token i < 256 is byte i; ids >= 256 are specials and decode to nothing."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` read from ``tokenizer.json``."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(checkpoint_dir: str | Path) -> HFTokenizer | None:
    """The checkpoint's tokenizer, or None when it has no ``tokenizer.json``."""
    path = Path(checkpoint_dir) / "tokenizer.json"
    return HFTokenizer(path) if path.exists() else None


def max_token_id(checkpoint_dir: str | Path) -> int | None:
    """The highest token id the checkpoint's tokenizer can produce, added and special tokens
    included: over ``tokenizer.json``'s vocabulary (a {token: id} dict, or Unigram's list of
    [token, score] whose ids are the positions) and its ``added_tokens``, and over
    ``tokenizer_config.json``'s ``added_tokens_decoder`` (ids transformers adds when loading).

    Returns:
      the id (an int), or None when neither file is present or lists any id.
    Raises:
      ValueError: one of the files is not JSON (naming it).
    """
    d = Path(checkpoint_dir)
    ids: list[int] = []
    for name in ("tokenizer.json", "tokenizer_config.json"):
        path = d / name
        if not path.is_file():
            continue
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a JSON file ({e})") from None
        if not isinstance(raw, dict):
            continue
        if name == "tokenizer.json":
            vocab = (raw.get("model") or {}).get("vocab")
            if isinstance(vocab, dict):
                ids += [int(i) for i in vocab.values()]
            elif isinstance(vocab, list) and vocab:
                ids.append(len(vocab) - 1)
            ids += [int(t["id"]) for t in raw.get("added_tokens") or [] if "id" in t]
        else:
            ids += [int(i) for i in raw.get("added_tokens_decoder") or {}]
    return max(ids) if ids else None
