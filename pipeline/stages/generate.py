"""``generate``: think with one budget of an elastic checkpoint, answer with another, streaming the text.

    python -m pipeline generate --checkpoint runs/tiny/elastic --think small --answer full \\
        --think-tokens 256 --prompt "Sort the list [5, 2, 9] in ascending order."

One copy of the weights is loaded; both budgets are views of it (docs/budget_control.md). ``--recipe`` is
optional (it only names the default checkpoint, <root>/<name>/elastic). Without ``--prompt`` the prompt is
read from stdin. The thinking trace and the answer stream to stdout; a summary line goes to stderr.
"""

from __future__ import annotations

import sys

from pipeline.errors import UserError


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", metavar="DIR", default="",
                        help="elastic checkpoint directory (default with --recipe: <root>/<name>/elastic)")
    parser.add_argument("--think", metavar="BUDGET", default="", help="budget that thinks (default: the smallest)")
    parser.add_argument("--answer", metavar="BUDGET", default="", help="budget that answers (default: the largest)")
    parser.add_argument("--think-tokens", type=int, default=1024, metavar="N",
                        help="thinking cap: after N tokens the trace is closed with </think> and the answer starts")
    parser.add_argument("--prompt", default=None, help="the user message (default: read stdin)")
    parser.add_argument("--max-new-tokens", type=int, default=512, metavar="N", help="answer tokens at most")
    parser.add_argument("--do-sample", action="store_true", help="sample (default: greedy)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --do-sample)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --do-sample)")
    parser.add_argument("--top-k", type=int, default=50, help="top-k sampling (with --do-sample)")
    parser.add_argument("--seed", type=int, default=None, help="torch seed for sampling")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp32", "fp16"), default="auto",
                        help="weight dtype (auto: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--engine", choices=("views", "sliced"), default="views",
                        help="views: both budgets on one copy of the weights; sliced: a contiguous copy per budget")


def _check(args) -> None:
    if args.think_tokens < 1 or args.max_new_tokens < 1:
        raise UserError("--think-tokens and --max-new-tokens must be >= 1")
    if args.do_sample and (args.temperature <= 0 or not 0 < args.top_p <= 1 or args.top_k < 0):
        raise UserError("sampling needs --temperature > 0, 0 < --top-p <= 1, --top-k >= 0")


def main(recipe, args) -> None:
    import os

    from pipeline.inference.chat import encode, render_prompt, special_tokens
    from pipeline.inference.control import Printer, Sampling, think_then_answer
    from pipeline.inference.family import Family, checkpoint_dir

    _check(args)
    ckpt = checkpoint_dir(recipe, args.checkpoint)
    if not os.path.isdir(ckpt):
        raise UserError(f"--checkpoint {ckpt}: no such directory")
    family = Family.load(ckpt, args.device, args.dtype, args.engine)
    think, answer = args.think or family.smallest(), args.answer or family.largest()
    small, large = family.model(think), family.model(answer)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise UserError("empty prompt (pass --prompt or pipe text on stdin)")
    special = special_tokens(family.tokenizer, ckpt)
    ids = encode(family.tokenizer, render_prompt(family.tokenizer, prompt))
    sampling = Sampling(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                        top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    printer = Printer(family.tokenizer, hide=special.stop)
    printer.write("<think>\n")
    r = think_then_answer(small, large, family.tokenizer, special, ids, args.think_tokens, sampling, printer)
    how = "closed by the model" if r.closed_by_model else f"cut at {args.think_tokens} tokens"
    ctx = "on the same model's cache" if r.cache_reused else f"after re-prefilling {r.context_tokens} tokens"
    print(f"[think: {think}, {len(r.think_ids)} tokens, {how}, {r.think_s:.2f} s | answer: {answer}, "
          f"{len(r.answer_ids)} tokens {ctx}, {r.answer_s:.2f} s]", file=sys.stderr)
