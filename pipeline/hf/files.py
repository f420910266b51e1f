"""Reading the small files of HF / elastic / run directories with one-line errors naming the file.

``read_json`` for config.json, elastic.json, budgets and markers; ``load_tokenizer_dir`` and
``special_token_ids`` for the tokenizer whose bos / eos / pad ids every exported and sliced config.json
carries (without them transformers falls back to NemotronH's defaults and generation stops on the wrong token).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

from pipeline.errors import UserError

TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
SPECIAL_TOKENS = ("bos", "eos", "pad")


def read_json(path: str, what: str = "JSON file", expect: type = dict) -> Any:
    """The parsed content of ``path``; UserError naming the file when it is missing, unreadable, not UTF-8,
    not JSON or not of type ``expect``."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: {what} not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: {what} is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: {what} is not valid JSON ({e.msg})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    if expect is not None and not isinstance(data, expect):
        raise UserError(f"{path}: {what} must hold a JSON {'object' if expect is dict else expect.__name__}, "
                        f"got {type(data).__name__}")
    return data


def has_tokenizer(directory: Optional[str]) -> bool:
    return bool(directory) and any(os.path.isfile(os.path.join(directory, n)) for n in TOKENIZER_MARKERS)


def load_tokenizer_dir(directory: str, what: str = "tokenizer"):
    """``AutoTokenizer`` from a local directory; one line naming it when the files are broken."""
    from transformers import AutoTokenizer

    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # their JSON errors name the file
        if os.path.isfile(os.path.join(directory, name)):
            read_json(os.path.join(directory, name), name)
    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as e:  # tokenizers raises a bare Exception for a malformed tokenizer.json
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{directory}: cannot load the {what} ({first})") from None


def special_token_ids(directory: str) -> Dict[str, Optional[int]]:
    """{bos_token_id, eos_token_id, pad_token_id} of the tokenizer in ``directory`` (None where it has none:
    written as null so that no model default stands in for it)."""
    tok = load_tokenizer_dir(directory)
    return {f"{k}_token_id": getattr(tok, f"{k}_token_id") for k in SPECIAL_TOKENS}
