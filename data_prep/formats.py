"""Record -> document text: a raw text field, or chat ``messages`` rendered with the tokenizer's chat template.

A record that cannot become a document raises ``Dropped`` with a reason (a key of ``DROP_REASONS``); the
caller counts it and records where it came from. Nothing is dropped anywhere else.
"""

from __future__ import annotations

import json

DROP_REASONS = {
    "malformed_json": "not valid JSON",
    "not_utf8": "not valid UTF-8",
    "not_an_object": "the record is not a JSON object",
    "missing_field": "the record lacks the configured field",
    "wrong_type": "a field has the wrong type",
    "empty": "the document is empty",
    "template_error": "the chat template failed on the messages",
    "unreadable": "the file could not be read",
}

# A string the reasoning probe looks for in the rendered template (see ``template_renders_reasoning``).
_PROBE = "reasoning-probe-7f3a"


class Dropped(Exception):
    def __init__(self, reason: str, detail: str = ""):
        assert reason in DROP_REASONS, reason
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


def parse_json_line(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Dropped("not_utf8", f"byte {e.start}") from None
    if not text.strip():
        raise Dropped("empty", "blank line")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise Dropped("malformed_json", e.msg + f" at column {e.colno}") from None
    if not isinstance(record, dict):
        raise Dropped("not_an_object", f"got a JSON {type(record).__name__}")
    return record


def decode_text_file(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Dropped("not_utf8", f"byte {e.start}") from None


def text_of(record: dict, field: str) -> str:
    if field not in record:
        raise Dropped("missing_field", f"no field {field!r}")
    text = record[field]
    if not isinstance(text, str):
        raise Dropped("wrong_type", f"field {field!r} is a {type(text).__name__}, not a string")
    if not text.strip():
        raise Dropped("empty", f"field {field!r} is blank")
    return text


def messages_of(record: dict, field: str) -> list:
    if field not in record:
        raise Dropped("missing_field", f"no field {field!r}")
    messages = record[field]
    if not isinstance(messages, list) or not messages:
        raise Dropped("wrong_type" if not isinstance(messages, list) else "empty",
                      f"field {field!r} must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise Dropped("wrong_type", f"{field}[{i}] needs string 'role' and 'content'")
        if not isinstance(m.get("reasoning_content", ""), (str, type(None))):
            raise Dropped("wrong_type", f"{field}[{i}].reasoning_content is not a string")
    return messages


def inline_reasoning(messages: list) -> list:
    """Move ``reasoning_content`` into the content as ``<think>\\n…\\n</think>\\n`` (templates that ignore it)."""
    out = []
    for m in messages:
        r = m.get("reasoning_content")
        m = {k: v for k, v in m.items() if k != "reasoning_content"}
        if r:
            m["content"] = f"<think>\n{r}\n</think>\n{m['content']}"
        out.append(m)
    return out


def render_chat(tokenizer, messages: list, inline: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(inline_reasoning(messages) if inline else messages, tokenize=False)
    except Exception as e:  # a template may raise anything (jinja errors, raise_exception(...))
        raise Dropped("template_error", f"{type(e).__name__}: {e}"[:200]) from None
    if not text.strip():
        raise Dropped("empty", "the chat template rendered nothing")
    return text


def render_chats(tokenizer, conversations: list, inline: bool) -> list:
    """``render_chat`` over many conversations: each entry is the text or the ``Dropped`` it raised.

    One batched template call when every conversation renders (cheaper), else one call each to say which failed.
    """
    if inline:
        conversations = [inline_reasoning(m) for m in conversations]
    try:
        texts = tokenizer.apply_chat_template(conversations, tokenize=False) if conversations else []
    except Exception:
        texts = None
    out = []
    for i, messages in enumerate(conversations):
        try:
            if texts is None or not texts[i].strip():
                out.append(render_chat(tokenizer, messages, inline=False))
            else:
                out.append(texts[i])
        except Dropped as d:
            out.append(d)
    return out


def template_renders_reasoning(tokenizer) -> bool:
    """Whether the chat template shows an assistant's ``reasoning_content`` (Nano v3's and the demo's do).

    When it does not, the data stage inlines the reasoning as ``<think>…</think>`` so no trace is lost.
    """
    probe = [{"role": "user", "content": "q"},
             {"role": "assistant", "reasoning_content": _PROBE, "content": "a"}]
    return _PROBE in tokenizer.apply_chat_template(probe, tokenize=False)
