"""Fine-tuning data: read documents, tokenize (chat template for ``messages``), pack with segment
ids, and iterate batches from any step (the data position of a checkpoint is the step).

    docs = read_documents("train.jsonl")               # or a .txt file, or a directory of them
    tok = DocumentTokenizer.from_checkpoint("CKPT_DIR") # tokenizer.json + chat template
    ds = PackedDataset.from_documents(docs, tok, seq_len=4096, max_segments=16)
    for step, batch in ds.batches(batch_size=8, start_step=0, seed=0): ...

Sources: JSONL with one object per line holding ``text`` (loss on every token) or ``messages``
([{"role", "content"}], rendered with the checkpoint's chat template; loss on the assistant
turns only); plain text files (one document each). A text document gets the EOS token appended.

Packing: each row of ``seq_len`` tokens holds whole documents one after the other (a document
longer than ``seq_len`` is cut into ``seq_len`` pieces), then padding; ``segment_ids`` numbers
the documents 1, 2, ... per row (0 = padding), at most ``max_segments - 1`` documents per row
(the padding run counts as a segment for the model's bound). ``targets[t]`` is the next token
of the same document and ``loss_mask[t]`` says whether that target is trained on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

TEXT_SUFFIXES = (".txt", ".md")


def data_files(path: str | Path) -> tuple[list[Path], list[str]]:
    """The files :func:`read_documents` reads from ``path``: ``path`` itself, or a directory's
    .jsonl / .json / text files (sorted by name, not its subdirectories); and the names it
    skips there (subdirectories, files of other suffixes).

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: a directory without data files.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such data file or directory")
    if not path.is_dir():
        return [path], []
    files, skipped = [], []
    for f in sorted(path.iterdir()):
        if f.is_file() and f.suffix in (".jsonl", ".json", *TEXT_SUFFIXES):
            files.append(f)
        else:
            skipped.append(f.name + ("/" if f.is_dir() else ""))
    if not files:
        raise ValueError(f"{path}: no data files in this directory (expected .jsonl / .json "
                         f"or {' / '.join(sorted(TEXT_SUFFIXES))} files; subdirectories are "
                         "not read)")
    return files, skipped


def _json_records(path: Path) -> Iterator[tuple[str, object]]:
    """(where, object) of a .jsonl / .json file: one JSON value per line, or, for a .json file
    holding one JSON value (an array of objects, as HF datasets write, or one object), its
    items. ``where`` is "FILE:LINE" or "FILE[INDEX]"."""
    text = path.read_text()
    if path.suffix == ".json":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # one object per line, then
        if isinstance(whole, list):
            yield from ((f"{path}[{i}]", obj) for i, obj in enumerate(whole))
            return
        if isinstance(whole, dict):
            yield str(path), whole
            return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{n}", json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e}); expected one JSON object per "
                             "line (JSONL)") from None


ROLES = ("system", "user", "assistant", "tool")


def read_documents(path: str | Path | list[Path]) -> list[dict]:
    """Documents from a JSONL file (``text`` or ``messages`` per line; a .json file may also
    hold one JSON array of such objects), a plain text file (one document) or a directory of
    such files (:func:`data_files`); or from the list of files :func:`data_files` gave (a
    caller that reports them reads what it reported).

    Returns:
      [{"text": str} or {"messages": list}, with "source": where it came from ("FILE:LINE" for a
      JSONL line, "FILE[INDEX]" for an item of a JSON array, "FILE" for a text file), which
      :meth:`DocumentTokenizer.encode` names in its errors].
    Raises:
      ValueError: a record that is not an object with ``text`` or ``messages``, or with a
        message that is not an object with ``role`` (one of ROLES) and ``content`` strings
        (names the file and line); a directory without data files.
      FileNotFoundError: ``path`` does not exist.
    """
    files = path if isinstance(path, list) else data_files(path)[0]
    docs = []
    for f in files:
        if f.suffix not in (".jsonl", ".json"):
            docs.append({"text": f.read_text(), "source": str(f)})
            continue
        for where, obj in _json_records(f):
            if not isinstance(obj, dict) or not (
                    isinstance(obj.get("text"), str) or isinstance(obj.get("messages"), list)):
                raise ValueError(  # noqa: TRY004 (bad data, not a bad argument)
                    f"{where}: expected an object with a 'text' string or a "
                    f"'messages' list, got {str(obj)[:80]!r}")
            if "messages" in obj:
                for i, m in enumerate(obj["messages"]):
                    if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                            and isinstance(m.get("content"), str)):
                        raise ValueError(  # noqa: TRY004 (bad data, not a bad argument)
                            f"{where}: message {i}: expected an object with 'role' and "
                            f"'content' strings, got {str(m)[:80]}")
                    if m["role"] not in ROLES:
                        raise ValueError(f"{where}: message {i}: role {m['role']!r}, expected "
                                         f"one of {', '.join(ROLES)}")
                docs.append({"messages": obj["messages"], "source": where})
            else:
                docs.append({"text": obj["text"], "source": where})
    return docs


@dataclasses.dataclass
class DocumentTokenizer:
    """Turns a document into (token ids, per-token trainable flags).

    Attributes:
      tokenizer: a ``tokenizers.Tokenizer``.
      chat_template: Jinja chat template (needed for ``messages`` documents).
      special: special-token strings for the template (bos_token, eos_token, ...).
      eos_id: appended to text documents (None: nothing appended).
    """

    tokenizer: object
    chat_template: str | None = None
    special: dict | None = None
    eos_id: int | None = None

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, eos_id: int | None = None
                        ) -> DocumentTokenizer:
        """From a checkpoint dir's tokenizer.json and chat template (if any); ``eos_id``
        defaults to the config's first eos_token_id, else the tokenizer's eos_token.

        Raises:
          FileNotFoundError: no tokenizer.json in the directory.
        """
        from tokenizers import Tokenizer

        from qnext_jax.chat import ChatTemplateError, load_chat_template, special_tokens

        d = Path(checkpoint_dir)
        if not (d / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{d}: no tokenizer.json (needed to tokenize the data)")
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        try:
            template = load_chat_template(d)
        except ChatTemplateError:
            template = None
        special = special_tokens(d)
        if eos_id is None and (d / "config.json").is_file():
            eos = json.loads((d / "config.json").read_text()).get("eos_token_id")
            eos_id = eos[0] if isinstance(eos, list) and eos else eos
        if eos_id is None and special.get("eos_token"):
            eos_id = tok.token_to_id(special["eos_token"])
        return cls(tok, template, special, eos_id)

    def encode(self, doc: dict) -> tuple[np.ndarray, np.ndarray]:
        """(ids [n] int32, trainable [n] bool) of one document.

        Raises:
          ValueError: a ``messages`` document without a chat template, with no assistant turn,
            or whose template fails to render (prefixed with the document's ``source``, e.g.
            "train.jsonl:3: ", when it has one).
        """
        if "text" in doc:
            ids = self.tokenizer.encode(doc["text"], add_special_tokens=False).ids
            if self.eos_id is not None:
                ids = ids + [int(self.eos_id)]
            return np.asarray(ids, np.int32), np.ones(len(ids), bool)
        try:
            return self._encode_chat(doc["messages"])
        except ValueError as e:
            if "source" not in doc:
                raise
            raise ValueError(f"{doc['source']}: {e}") from None

    def _render(self, messages, add_generation_prompt):
        from qnext_jax.chat import render_chat

        return render_chat(self.chat_template, messages, self.special,
                           add_generation_prompt=add_generation_prompt)

    def assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of its assistant turns.

        A turn's span is what rendering it adds after the generation prompt (its content and
        the template's end-of-turn text), found by rendering prefixes of the conversation; for
        templates that re-render earlier turns differently (not prefix-stable), the span is the
        turn's content found in the full text.
        """
        if not self.chat_template:
            raise ValueError("a 'messages' document needs a chat template (chat_template.jinja "
                             "or tokenizer_config.json's chat_template in the checkpoint)")
        full = self._render(messages, False)
        spans, cursor = [], 0
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            prefix = self._render(messages[:i], True)
            upto = self._render(messages[:i + 1], False)
            if full.startswith(upto) and upto.startswith(prefix) and len(prefix) >= cursor:
                spans.append((len(prefix), len(upto)))
                cursor = len(upto)
            else:
                content = m.get("content") or ""
                at = full.find(content, cursor)
                if content and at >= 0:
                    spans.append((at, at + len(content)))
                    cursor = at + len(content)
        return full, spans

    def _encode_chat(self, messages):
        full, spans = self.assistant_spans(messages)
        if not spans:
            raise ValueError("a 'messages' document has no assistant turn to train on (the "
                             "loss covers assistant turns only): expected at least one "
                             "message with role 'assistant'")
        enc = self.tokenizer.encode(full, add_special_tokens=False)
        starts = np.asarray([o[0] for o in enc.offsets], np.int64)
        trainable = np.zeros(len(enc.ids), bool)
        for a, b in spans:
            trainable |= (starts >= a) & (starts < b)
        return np.asarray(enc.ids, np.int32), trainable


def pack_documents(docs: Iterable[tuple[np.ndarray, np.ndarray]], seq_len: int,
                   max_segments: int = 16, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Pack tokenized documents into rows of ``seq_len`` (greedy, in order).

    Args:
      docs: (ids [n], trainable [n]) per document; ``trainable[t]`` says whether token t is a
        training target.
      seq_len: tokens per row. max_segments: the model's bound on runs per row (>= 2).
    Returns:
      {"input_ids", "targets", "segment_ids" (int32), "loss_mask" (float32)}: [rows, seq_len].
    Raises:
      ValueError: no tokens, or no token that is a training target (a run would train on
        nothing); max_segments < 2.
    """
    if max_segments < 2:
        raise ValueError(f"max_segments must be >= 2 (documents + a padding run), got "
                         f"{max_segments}")
    T = int(seq_len)
    rows: list[dict[str, np.ndarray]] = []
    cur = None
    used = nseg = 0

    def new_row():
        return {"input_ids": np.full(T, pad_id, np.int32), "targets": np.zeros(T, np.int32),
                "segment_ids": np.zeros(T, np.int32), "loss_mask": np.zeros(T, np.float32)}

    for ids, trainable in docs:
        ids, trainable = np.asarray(ids, np.int32), np.asarray(trainable, bool)
        n = len(ids)
        for s in range(0, n, T):  # pieces of at most T tokens
            piece = slice(s, min(s + T, n))
            L = piece.stop - piece.start
            if L < 1:
                continue
            if cur is None or used + L > T or nseg + 1 > max_segments - 1:
                if cur is not None:
                    rows.append(cur)
                cur, used, nseg = new_row(), 0, 0
            nseg += 1
            seg = slice(used, used + L)
            cur["input_ids"][seg] = ids[piece]
            cur["segment_ids"][seg] = nseg
            # target of token t is token t+1 of the same document (the piece's last token
            # predicts the next piece's first: the document continues there).
            nxt = np.arange(piece.start + 1, piece.stop + 1)
            has = nxt < n
            cur["targets"][seg] = np.where(has, ids[np.minimum(nxt, n - 1)], 0)
            cur["loss_mask"][seg] = (has & trainable[np.minimum(nxt, n - 1)]).astype(np.float32)
            used += L
    if cur is not None:
        rows.append(cur)
    if not rows:
        raise ValueError("no tokens to pack (empty dataset)")
    packed = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    if not packed["loss_mask"].any():
        raise ValueError("no training targets in the dataset: a document needs at least 2 "
                         "tokens (a chat document a non-empty assistant reply) for one to "
                         "predict the next")
    return packed


@dataclasses.dataclass
class PackedDataset:
    """Packed rows and a deterministic, resumable batch order.

    Batch ``i`` (0-based step) is rows ``perm_e[j : j + batch_size]`` of epoch e, where the
    epoch's permutation comes from ``seed + e``; so the data position of a checkpoint is just
    its step.
    """

    rows: dict[str, np.ndarray]
    max_segments: int = 16

    @classmethod
    def from_documents(cls, docs: Iterable[dict], tokenizer: DocumentTokenizer, seq_len: int,
                       max_segments: int = 16, pad_id: int = 0) -> PackedDataset:
        encoded = (tokenizer.encode(d) for d in docs)
        return cls(pack_documents(encoded, seq_len, max_segments, pad_id), max_segments)

    @property
    def num_rows(self) -> int:
        return int(self.rows["input_ids"].shape[0])

    def fingerprint(self) -> str:
        """A short hash (16 hex digits, SHA-256) of the packed rows: the same data, tokenized
        and packed alike, gives the same fingerprint (a resumed run checks it)."""
        digest = hashlib.sha256()
        for name in sorted(self.rows):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(self.rows[name]).tobytes())
        return digest.hexdigest()[:16]

    @property
    def seq_len(self) -> int:
        return int(self.rows["input_ids"].shape[1])

    def batch_at(self, step: int, batch_size: int, seed: int = 0, shuffle: bool = True
                 ) -> dict[str, np.ndarray]:
        """The batch of a step (rows wrap around epochs; an epoch shorter than a batch repeats
        rows within the batch)."""
        n = self.num_rows
        idx = []
        pos = step * batch_size
        while len(idx) < batch_size:
            epoch, j = divmod(pos, n)
            perm = (np.random.default_rng(seed + epoch).permutation(n) if shuffle
                    else np.arange(n))
            take = min(batch_size - len(idx), n - j)
            idx.extend(perm[j:j + take].tolist())
            pos += take
        return {k: v[idx] for k, v in self.rows.items()}

    def batches(self, batch_size: int, start_step: int = 0, seed: int = 0,
                shuffle: bool = True) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(step, batch) from ``start_step`` on, forever."""
        step = start_step
        while True:
            yield step, self.batch_at(step, batch_size, seed, shuffle)
            step += 1
