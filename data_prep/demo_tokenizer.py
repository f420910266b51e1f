"""A small byte-level BPE trained offline on the demo corpus, saved as a HF tokenizer directory.

Special tokens: ``<|endoftext|>`` (eos, the EOD appended to every document), ``<|pad|>``, ``<|im_start|>``,
``<|im_end|>``; ``<think>`` and ``</think>`` are added tokens that survive decoding (as in Qwen3 / Nano v3).
The chat template is ChatML with the assistant's ``reasoning_content`` rendered as ``<think>\\n…\\n</think>\\n``
before its answer. The vocabulary, special tokens included, is exactly ``vocab_size`` (given enough text).
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Iterator

EOS, PAD, IM_START, IM_END = "<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SPECIAL_TOKENS = [EOS, PAD, IM_START, IM_END]
META_FILE = "demo_tokenizer.json"
TRAIN_BYTES = 1 << 20  # per corpus file

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' and message['reasoning_content'] is defined"
    " and message['reasoning_content'] %}"
    "{{- '<think>\\n' + message['reasoning_content'] + '\\n</think>\\n' }}"
    "{%- endif %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def record_texts(paths: Iterable[str], max_bytes: int = TRAIN_BYTES) -> Iterator[str]:
    """The strings of demo jsonl files (text fields and chat message contents) to train the BPE on: the first
    ``max_bytes`` of each file (a 512-token BPE needs little text, and this keeps the demo stage quick)."""
    for path in paths:
        with open(path, "rb") as f:
            for line in f.readlines(max_bytes):
                rec = json.loads(line)
                if "text" in rec:
                    yield rec["text"]
                for m in rec.get("messages", ()):
                    yield m.get("reasoning_content", "")
                    yield m["content"]


def train_demo_tokenizer(out_dir: str, corpus_paths: Iterable[str], vocab_size: int, meta: dict) -> None:
    """Train the BPE on ``corpus_paths`` and save a HF tokenizer directory (with chat template) to ``out_dir``.

    ``meta`` (what the corpus was generated from) is saved beside it so a changed corpus retrains.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 2,  # + <think>, </think> below
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(record_texts(corpus_paths), trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK_OPEN, THINK_CLOSE)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
    hf.chat_template = CHAT_TEMPLATE
    tmp = out_dir + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    hf.save_pretrained(tmp)
    with open(os.path.join(tmp, META_FILE), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    if os.path.isdir(out_dir):
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def is_current(out_dir: str, meta: dict) -> bool:
    """True when ``out_dir`` holds a demo tokenizer trained from the corpus ``meta`` describes."""
    try:
        with open(os.path.join(out_dir, META_FILE)) as f:
            return json.load(f) == meta
    except (OSError, ValueError):
        return False
