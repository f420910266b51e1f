"""Budget control: think with a small nested model M_S, answer with a large one M_L.

1. M_S generates after the prompt's open ``<think>`` until it writes ``</think>`` or reaches the thinking cap
   (or ends its turn). A trace cut at the cap is closed by appending ``\\n</think>\\n``, as the default
   token-budget control of Nano v3 does (a cap on thinking tokens, then a forced answer).
2. M_L reads the WHOLE context (prompt + trace + close) in one prefill and generates the answer.
   M_S's KV cache and SSM state cannot be handed over: M_L has other widths (hidden size, heads), so its
   per-layer K/V, conv and SSM states are different tensors; the context is re-prefilled. When one model
   does both phases (L->L, S->S, the token-budget control) it continues on its own cache instead (only the
   trace's last token and the close are new), as a plain single-model deployment would: the re-prefill is
   the price of switching widths, and the latencies say so.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch.nn.utils import parametrize

from pipeline.inference.chat import THINK_CLOSE, SpecialTokens, encode


@dataclass
class Sampling:
    """As transformers' ``generate``: greedy unless ``do_sample``."""

    max_new_tokens: int = 256  # answer tokens at most
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    seed: Optional[int] = None


@dataclass
class Result:
    think_ids: List[int]
    answer_ids: List[int]
    think_text: str
    answer_text: str
    closed_by_model: bool  # False: the trace was cut at the cap (or the turn ended) and closed for it
    think_s: float
    answer_s: float
    prompt_tokens: int
    context_tokens: int = 0  # the answer phase's context
    cache_reused: bool = False  # one model did both phases: the answer continued on its cache

    @property
    def seconds(self) -> float:
        return self.think_s + self.answer_s

    @property
    def generated(self) -> int:
        return len(self.think_ids) + len(self.answer_ids)


class Printer:
    """A transformers streamer that prints the new tokens' text as it comes (prompt skipped, stop ids hidden)."""

    def __init__(self, tokenizer, hide=(), out=None):
        self.tokenizer, self.hide, self.out = tokenizer, set(hide), out or sys.stdout
        self.ids: List[int] = []
        self.shown, self.prompt_seen = "", False

    def put(self, value):
        if not self.prompt_seen:  # generate() first puts the prompt
            self.prompt_seen = True
            return
        self.ids += [int(i) for i in value.reshape(-1).tolist() if int(i) not in self.hide]
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):  # half a multi-byte character: wait for the rest
            return
        self.out.write(text[len(self.shown):])
        self.out.flush()
        self.shown = text

    def end(self):
        self.prompt_seen = False
        self.ids, self.shown = [], ""

    def write(self, text: str):
        self.out.write(text)
        self.out.flush()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generate(model, ids: List[int], max_new: int, stop: List[int], special: SpecialTokens, s: Sampling,
              streamer=None, cache=None):
    """(new token ids, seconds, the cache after them)."""
    from transformers import GenerationConfig

    sample = dict(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k) if s.do_sample else {}
    gc = GenerationConfig(max_new_tokens=max_new, do_sample=s.do_sample, eos_token_id=stop,
                          pad_token_id=special.pad, bos_token_id=special.bos, use_cache=True,
                          return_dict_in_generate=True, **sample)
    # past_key_values (not its newer alias ``cache``): the name every transformers 5.x release accepts
    extra = {"past_key_values": cache} if cache is not None else {}
    x = torch.tensor([ids], device=model.device)
    _sync(x.device)
    t0 = time.perf_counter()
    # a budget view gathers its grouped-head rows once per generate() call, not once per token (views.py)
    with torch.no_grad(), parametrize.cached():
        out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=gc, streamer=streamer, **extra)
    _sync(x.device)
    return out.sequences[0, len(ids):].tolist(), time.perf_counter() - t0, out.past_key_values


def think_then_answer(think_model, answer_model, tokenizer, special: SpecialTokens, prompt_ids: List[int],
                      think_cap: int, sampling: Sampling, printer: Optional[Printer] = None) -> Result:
    """Phase 1 on ``think_model`` (at most ``think_cap`` tokens), phase 2 on ``answer_model`` (see module doc)."""
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    new, think_s, cache = _generate(think_model, prompt_ids, think_cap, [special.think_close] + special.stop,
                                    special, sampling, printer)
    closed = bool(new) and new[-1] == special.think_close
    think = new[:-1] if new and new[-1] in [special.think_close] + special.stop else new
    if closed:  # the model wrote </think>: keep its token, add the newline the template puts after it
        close_text, context = "\n", prompt_ids + think + [special.think_close] + encode(tokenizer, "\n")
    else:  # cut at the cap (or the turn ended inside the trace): close it for the model
        close_text = "\n" + THINK_CLOSE + "\n"
        context = prompt_ids + think + encode(tokenizer, close_text)
    if printer:
        printer.write(close_text)
    same = think_model is answer_model
    answer, answer_s, _ = _generate(answer_model, context, sampling.max_new_tokens, special.stop, special, sampling,
                                    printer, cache if same else None)
    if answer and answer[-1] in special.stop:
        answer = answer[:-1]
    if printer:
        printer.write("\n")
    return Result(think_ids=think, answer_ids=answer, think_text=tokenizer.decode(think),
                  answer_text=tokenizer.decode(answer, skip_special_tokens=True), closed_by_model=closed,
                  think_s=think_s, answer_s=answer_s, prompt_tokens=len(prompt_ids), context_tokens=len(context),
                  cache_reused=same)
