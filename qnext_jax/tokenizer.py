"""Tokenizers for generation: the checkpoint's ``tokenizer.json`` (via ``tokenizers``), or raw
UTF-8 bytes for the built-in demo model."""

from __future__ import annotations

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
