"""Prompts and special tokens: the chat template, the thinking markers, the ids generation stops on.

The ids come from the tokenizer, never from config.json: a config.json written without eos/bos/pad ids holds
transformers' NemotronH defaults once saved (eos 2, pad 0), which stop on whatever token has id 2 (in the demo
tokenizer ``<|im_start|>``); generate() is always given the tokenizer's ids explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from pipeline.errors import UserError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
END_OF_TURN = ("<|im_end|>", "<|end_of_text|>", "<|eot_id|>")  # ChatML / Nano v3, Llama-style


@dataclass
class SpecialTokens:
    stop: List[int]  # the answer ends on any of these (eos, end of turn)
    think_close: int  # the thinking phase ends on this (</think>)
    pad: int
    bos: Optional[int]


def _single_id(tokenizer, text: str) -> Optional[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def special_tokens(tokenizer, where: str = "tokenizer") -> SpecialTokens:
    close = _single_id(tokenizer, THINK_CLOSE)
    if close is None:
        raise UserError(f"{where}: {THINK_CLOSE!r} is not one token of the tokenizer; budget control needs the "
                        "thinking markers as tokens")
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for text in END_OF_TURN:
        i = _single_id(tokenizer, text) if text in tokenizer.get_vocab() else None
        if i is not None:
            stop.append(i)
    stop = sorted(set(stop))
    if not stop:
        raise UserError(f"{where}: no eos token (set eos_token in the tokenizer)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    return SpecialTokens(stop=stop, think_close=close, pad=pad, bos=tokenizer.bos_token_id)


def render_prompt(tokenizer, prompt: str) -> str:
    """The user turn through the chat template, ending inside an open ``<think>`` (the thinking phase)."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the checkpoint's tokenizer has no chat template (tokenizer_config.json: chat_template)")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    if text.rstrip().endswith(THINK_OPEN):
        return text if text.endswith("\n") else text + "\n"
    return text + THINK_OPEN + "\n"


def encode(tokenizer, text: str) -> List[int]:
    return tokenizer.encode(text, add_special_tokens=False)
