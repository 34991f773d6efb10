"""Chat prompts: the checkpoint's chat template (Jinja, rendered with ``jinja2`` in a sandbox the
way transformers' ``apply_chat_template`` does), its stop tokens, and incremental detokenizing
for streaming.

    template = load_chat_template(ckpt)              # chat_template.jinja or tokenizer_config.json
    text = render_chat(template, [{"role": "user", "content": "Hi"}], special_tokens(ckpt))
    stops = stop_token_ids(ckpt, template, tokenizer)  # e.g. <|im_end|> + generation_config eos
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token",
                      "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """A checkpoint without a usable chat template, or a template that fails to render."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:
        raise ChatTemplateError(f"{path} is not valid JSON: {e}") from None


def load_chat_template(checkpoint_dir: str | Path) -> str:
    """The chat template of a checkpoint: ``chat_template.jinja``, else the ``chat_template`` of
    ``tokenizer_config.json`` (a string, or a list of {"name", "template"}: the "default" one).

    Raises:
      ChatTemplateError: neither file holds a template.
    """
    d = Path(checkpoint_dir)
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text()
    tpl = _read_json(d / "tokenizer_config.json").get("chat_template")
    if isinstance(tpl, list):
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default") or next(iter(named.values()), None)
    if not isinstance(tpl, str) or not tpl:
        raise ChatTemplateError(f"{d} has no chat template (chat_template.jinja, or "
                                "'chat_template' in tokenizer_config.json)")
    return tpl


def special_tokens(checkpoint_dir: str | Path) -> dict[str, str]:
    """bos_token, eos_token, ... as strings from ``tokenizer_config.json`` (those present)."""
    cfg = _read_json(Path(checkpoint_dir) / "tokenizer_config.json")
    out = {}
    for key in SPECIAL_TOKEN_KEYS:
        v = cfg.get(key)
        if isinstance(v, dict):  # an AddedToken serialisation
            v = v.get("content")
        if isinstance(v, str):
            out[key] = v
    return out


def _environment():
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def render_chat(template: str, messages: list[dict], tokens: dict[str, str] | None = None, *,
                add_generation_prompt: bool = True, tools: list[dict] | None = None,
                **kwargs) -> str:
    """Render ``messages`` ([{"role", "content"}, ...]) with a Jinja chat template.

    The template sees ``messages``, ``tools``, ``documents`` (None), ``add_generation_prompt``,
    the special-token strings ``tokens`` (bos_token, eos_token, ...) and ``kwargs`` (e.g.
    ``enable_thinking``), as in transformers' ``apply_chat_template(tokenize=False)``.

    Raises:
      ChatTemplateError: the template does not compile, or raises while rendering.
    """
    import jinja2

    try:
        compiled = _environment().from_string(template)
        return compiled.render(messages=messages, tools=tools, documents=None,
                               add_generation_prompt=add_generation_prompt,
                               **(tokens or {}), **kwargs)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from None


def stop_token_ids(checkpoint_dir: str | Path | None, template: str | None, tokenizer,
                   config_eos: tuple[int, ...] = ()) -> tuple[int, ...]:
    """Ids that end an assistant turn: the template's end-of-turn token (the special token the
    template writes right after an assistant message, e.g. ``<|im_end|>``), the tokenizer's
    eos_token, ``generation_config.json``'s eos_token_id and the model config's eos ids.

    ``tokenizer`` needs ``encode(text) -> ids`` (without adding special tokens).
    """
    ids: list[int] = list(config_eos)
    d = None if checkpoint_dir is None else Path(checkpoint_dir)
    if d is not None:
        gen_eos = _read_json(d / "generation_config.json").get("eos_token_id")
        ids += [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
    tokens = special_tokens(d) if d is not None else {}
    if template is not None and tokenizer is not None:
        mark = "\u2063qnext-end-probe\u2063"
        try:
            text = render_chat(template, [{"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": mark}], tokens,
                               add_generation_prompt=False)
        except ChatTemplateError:
            text = ""
        tail = text.split(mark, 1)[1] if mark in text else ""
        tail_ids = tokenizer.encode(tail) if tail.strip() else []
        # Only a special token ends the turn (it decodes to nothing without specials).
        if tail_ids and tokenizer.decode([tail_ids[0]]) == "":
            ids.append(tail_ids[0])
    if tokenizer is not None and "eos_token" in tokens:
        eos_ids = tokenizer.encode(tokens["eos_token"])
        if len(eos_ids) == 1:
            ids.append(eos_ids[0])
    return tuple(dict.fromkeys(int(i) for i in ids))


class StreamDecoder:
    """Turns a growing list of token ids into text increments for streaming.

    Each :meth:`push` decodes the whole list and returns what is new; text that ends in an
    incomplete UTF-8 sequence (U+FFFD at the end) is held back until the next token.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """The text held back at the end (an incomplete UTF-8 sequence, as U+FFFD), so that
        the increments add up to ``tokenizer.decode(ids)``."""
        return self._advance(self.tokenizer.decode(self.ids))

    def _advance(self, text: str) -> str:
        new = text.removeprefix(self.text)
        self.text = text
        return new
