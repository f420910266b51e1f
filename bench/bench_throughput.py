"""Pretrain, plain KD and elastic (stage 1) steps of one recipe side by side in one process: tokens/s, TFLOP/s,
MFU and peak memory, per backend (megatron local / Transformer Engine) and precision (bf16 / FP8).

    python bench/bench_throughput.py --recipe recipes/proxy_1b.yaml              # H200: every combination + seq 8192
    python bench/bench_throughput.py --recipe recipes/tiny.yaml --steps 1 --memory-seq 0   # CPU smoke check
    ... --save-stall /tmp/ckpt        # + the step stall of a checkpoint save, sync vs async
    ... --profile 25                  # + a profiling pass: GPU-busy share, host syncs, top 25 kernels / host ops
    ... --micro-batch-sizes 4,8 --variant fused:model.moe_fused_grouped_mlp=true   # side by side

Each step is a full training step as ``pipeline.training.loop.Trainer`` runs it: megatron DDP (overlap as in
the recipe), the forward-backward schedule over ``--micro-batches`` micro-batches of the stage-1 shape, the
megatron optimizer step. pretrain: the plain student, next-token loss. plain KD: the same student and a frozen
teacher (same architecture), the chunked vocab-parallel KD loss. elastic: the elastic student (router, nested
masks, hard choices, budget loss) with that teacher and loss: what stage 1 runs. Weights are random (the cost does
not depend on them). FLOPs per token: ``pipeline.training.metrics.flops_per_token`` (docs/throughput.md). Peak
memory is ``torch.cuda.max_memory_allocated`` over the timed steps above what was allocated before that step's
student was built, plus the teacher: megatron's DDP keeps a deleted model's tensors allocated, so the plain
student would otherwise count in the elastic step's peak (it did, by 18.5 GiB, on the H200 on 2026-12-03).
``--memory-seq``: the elastic vs plain KD peak memory at that sequence length (micro-batch size scaled to keep the tokens per micro-batch), first combination.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from functools import partial
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import quiet_libraries  # noqa: E402

quiet_libraries()

import torch  # noqa: E402

from pipeline import parallel  # noqa: E402
from pipeline.config.load import load_recipe  # noqa: E402
from pipeline.errors import UserError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def default_combos() -> str:
    if not te_available():
        return "local:bf16" if torch.cuda.is_available() else "local:fp32"
    fp8 = torch.cuda.get_device_capability() >= (8, 9)
    return "local:bf16,te:bf16" + (",te:fp8" if fp8 else "")


class Bench:
    def __init__(self, args, recipe, device, warmup: int, profiling: bool = False):
        """``profiling``: ``measure`` profiles its steps (``profile``) instead of timing them."""
        self.args, self.recipe, self.device = args, recipe, device
        self.t = recipe.stage1.training
        self.cuda = device.type == "cuda"
        self.warmup, self.profiling = warmup, profiling

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def trained(self, task, bf16: bool):
        """(DDP-wrapped model, optimizer) as the Trainer builds them."""
        from megatron.core.transformer.module import Float16Module

        from pipeline.training.optim import build_optimizer, hook_model_config, wrap_ddp

        model = task.build_model(torch.bfloat16 if bf16 else torch.float32)
        if bf16:
            model = Float16Module(model.config, model)
        ddp = wrap_ddp(self.recipe, model, task.overlap_grad_reduce_ok())
        opt, _ = build_optimizer(self.recipe, self.t, [ddp], bf16, task.optimizer_overrides())
        hook_model_config([ddp], opt)
        task.num_microbatches = self.args.micro_batches
        return ddp, opt

    def teacher(self, bf16: bool):
        from megatron.core.transformer.module import Float16Module

        from pipeline.model.build import build_model

        model = build_model(self.recipe, torch.bfloat16 if bf16 else torch.float32, fp8=self.t.fp8)
        model.requires_grad_(False).eval()
        return Float16Module(model.config, model) if bf16 else model

    def batches(self, mbs: int, seq: int):
        from pipeline.training.synthetic import synthetic_batches

        stream = synthetic_batches(self.recipe.model.vocab_size, seq, self.recipe.run.seed, 0, mbs, 0, 1)
        return [next(stream) for _ in range(self.args.micro_batches)]

    @staticmethod
    def stepper(ddp, opt, task, batches, seq: int, mbs: int):
        """``step(i)``: training step i as the Trainer runs it."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def step(i):
            ddp.zero_grad_buffer()
            opt.zero_grad()
            task.begin_step(i)
            get_forward_backward_func()(forward_step_func=task.forward_step, data_iterator=iter(batches),
                                        model=[ddp], num_microbatches=len(batches), seq_length=seq,
                                        micro_batch_size=mbs, forward_only=False, **task.schedule_kwargs())
            opt.step()

        return step

    def measure(self, ddp, opt, task, batches, seq: int, mbs: int, label: str = ""):
        """(median seconds per step, peak GiB) over --steps steps after the warm-up; None when profiling."""
        step = self.stepper(ddp, opt, task, batches, seq, mbs)
        for i in range(self.warmup):
            step(i)
        self.sync()
        if self.profiling:
            print(f"\n== {label} ==", flush=True)
            self.profile(step, self.warmup)
            return None
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(self.args.steps):
            start = time.perf_counter()
            step(self.warmup + i)
            self.sync()
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else float("nan")
        return statistics.median(times), peak

    def profile(self, step, i: int) -> None:
        """Where a step's time goes, from four more steps: one plain (its wall time), one that counts the
        operators dispatched by source line (each a launch on the GPU), one that counts the host syncs torch
        reports (``torch.cuda.set_sync_debug_mode``) by source line, one under torch.profiler (the
        top kernels by GPU time and the top operators by host time). The GPU is busy for the kernels' summed
        time; the rest of the wall time it waits for the host (launches, syncs)."""
        from torch.profiler import ProfilerActivity, profile

        start = time.perf_counter()
        step(i)
        self.sync()
        wall = time.perf_counter() - start
        print_op_counts(step, i + 1, self.sync, self.args.profile)
        if self.cuda:
            print_host_syncs(step, i + 2, self.sync)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        with profile(activities=activities) as prof:
            step(i + 3)
            self.sync()
        averages = prof.key_averages()
        n = self.args.profile
        if self.cuda:
            print(averages.table(sort_by="self_cuda_time_total", row_limit=n, max_name_column_width=60), flush=True)
            kernels = [(e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type == torch.autograd.DeviceType.CUDA]
            busy = covered(kernels) / 1e6  # us -> s
            print(f"  GPU busy {busy:.3f} s of a {wall:.3f} s step ({busy / wall:.0%}); the rest it waits for the "
                  "host", flush=True)
        print(averages.table(sort_by="self_cpu_time_total", row_limit=n, max_name_column_width=60), flush=True)


def covered(intervals) -> float:
    """Length of the union of [start, end) intervals: the time any kernel ran, concurrent streams once."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def source_line(filename: str, lineno: int) -> str:
    """``path:line`` relative to the repo, or to site-packages for an installed library."""
    if "site-packages" + os.sep in filename:
        filename = filename.split("site-packages" + os.sep)[-1]
    elif filename.startswith(ROOT):
        filename = os.path.relpath(filename, ROOT)
    return f"{filename}:{lineno}"


def op_sites(step, i: int, sync):
    """(operators dispatched, Counter of the Python line that issued each) for one step: on a host-bound GPU step
    every operator is a launch, so their number is the host's cost. The line is the innermost frame outside torch
    (a backward's operators: the line that ran it, megatron's schedule; "backward (autograd engine)" when the engine
    ran them on its own thread, as on a GPU)."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    sites = collections.Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            site, frame = "backward (autograd engine)", sys._getframe(1)
            while frame is not None:
                name = frame.f_code.co_filename
                if os.sep + "torch" + os.sep not in name and name != __file__:
                    site = source_line(name, frame.f_lineno)
                    break
                frame = frame.f_back
            sites[site] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        step(i)
    sync()
    return sum(sites.values()), sites


def print_op_counts(step, i: int, sync, top: int) -> None:
    total, sites = op_sites(step, i, sync)
    print(f"  operators dispatched in one step: {total:,}", flush=True)
    for site, count in sites.most_common(top):
        print(f"    {count:6d}  {site}", flush=True)


def print_host_syncs(step, i: int, sync) -> None:
    """One step with torch's sync debug mode on: each synchronizing CUDA call torch makes (``.item()``,
    ``.tolist()``, ``.cpu()``, non-pinned copies to the host, ``nonzero`` ...) warns from the Python line that made
    it; printed as counts per line. Syncs inside extensions (cudaStreamSynchronize in C++) are not seen."""
    import collections
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(i)
            sync()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites = collections.Counter(source_line(w.filename, w.lineno) for w in caught if "synchronizing" in str(w.message))
    print(f"  host syncs in one step: {sum(sites.values())}", flush=True)
    for site, count in sites.most_common(15):
        print(f"    {count:5d}  {site}", flush=True)


def kd_task(base, teacher, chunk: int, temperature: float):
    """A plain KD task: the student's logits against the frozen teacher's, same loss as the elastic stages."""
    from pipeline.elastic.kd import forward_kl
    from pipeline.elastic.task import model_precision_output
    from pipeline.training.task import token_mean

    class KDTask(type(base)):
        teacher_forward = True

        def forward_step(self, data_iterator, model):
            batch = {k: v.to(self.device) for k, v in next(data_iterator).items()}
            with torch.no_grad():
                t_out = teacher(batch["tokens"], batch["position_ids"], None, **model_precision_output(teacher))
            s_out = model(batch["tokens"], batch["position_ids"], None, **model_precision_output(model))

            def loss(mask, out):
                value, logged = token_mean(forward_kl(out, t_out, mask, temperature, chunk_tokens=chunk), mask)
                return value, {"loss": logged}

            return s_out, partial(loss, batch["loss_mask"])

    task = KDTask(base.recipe, base.stage)
    task.device = base.device
    return task


def allocated_gib() -> float:
    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def run_combo(args, overrides, backend: str, precision: str, seq: int, mbs: int, kinds, rows, warmup: int,
              variant: str = "recipe", profiling: bool = False) -> Optional[str]:
    """``measure_combo``; None, or for a combination that failed its one-line report (printed with the last frames)
    while the bench goes on with the others (their figures stand)."""
    import traceback

    try:
        measure_combo(args, overrides, backend, precision, seq, mbs, kinds, rows, warmup, variant, profiling)
        return None
    except Exception as e:  # noqa: BLE001 - any failure of one variant (OOM, a kernel's refusal) is reported
        first_line = str(e).splitlines()[0] if str(e) else ""
        failure = f"{variant} {backend} {precision} {seq} {mbs}: {type(e).__name__}: {first_line}"
        print(f"  FAILED {failure}", flush=True)
        if not isinstance(e, UserError):  # a recipe mistake is its one line; anything else shows where
            traceback.print_exc(limit=-4)
        parallel.shutdown()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return failure


def measure_combo(args, overrides, backend: str, precision: str, seq: int, mbs: int, kinds, rows, warmup: int,
                  variant: str, profiling: bool):
    from pipeline.elastic.task import ElasticTask
    from pipeline.inference.views import parameter_bytes
    from pipeline.training import metrics
    from pipeline.training.task import LMTask

    # precision: bf16 | fp32 | fp8 (= TE's delayed scaling) | delayed | current | blockwise (training.fp8 recipes)
    fp8 = {"bf16": "none", "fp32": "none", "fp8": "delayed"}.get(precision, precision)
    recipe = load_recipe(args.recipe, overrides + [
        f"model.backend={backend}", f"stage1.training.fp8={fp8}", f"stage1.training.seq_length={seq}",
        f"stage1.training.micro_batch_size={mbs}"])
    device = parallel.initialize(recipe)
    bench = Bench(args, recipe, device, warmup, profiling)
    bf16 = precision != "fp32"
    batches = bench.batches(mbs, seq)
    tokens = len(batches) * mbs * seq
    peak_tflops = metrics.peak_tflops(recipe.logging.peak_tflops)
    e = recipe.elastic
    chunk = recipe.stage1.training.kd_chunk_tokens

    def record(kind, measured, teacher):
        if measured is None:  # the profiling pass
            return
        seconds, mem = measured
        fpt = metrics.flops_per_token(recipe.model, seq, teacher_forward=teacher)
        tps = tokens / seconds
        rows.append({"variant": variant, "backend": backend, "precision": precision, "seq": seq, "mbs": mbs,
                     "step": kind, "seconds": seconds, "tokens_per_s": tps, "tflops": tps * fpt / 1e12,
                     "mfu": tps * fpt / (peak_tflops * 1e12) if peak_tflops else float("nan"), "peak_gib": mem})
        r = rows[-1]
        print(f"  {variant:8s} {backend:5s} {precision:4s} seq {seq:5d} mb {mbs:2d} {kind:8s} {seconds:8.4f} s  "
              f"{tps:10,.0f} tok/s  {r['tflops']:7.1f} TFLOP/s  MFU {r['mfu']:6.1%}  peak {mem:7.2f} GiB", flush=True)

    lm = LMTask(recipe, "stage1")
    lm.device = device
    teacher = None
    combo = f"{variant} {backend} {precision} seq {seq} mb {mbs}"

    def own(measured, base, resident=0.0):
        """(seconds, this step's models' peak): megatron's DDP keeps a deleted model's tensors alive (its grad
        hooks sit on autograd nodes outside Python's garbage collector: on CPU, weakrefs to the plain student,
        its DDP wrapper and optimizer survive ``del`` + ``gc.collect()``), so the peak is taken above what was
        allocated before this step's student was built, plus ``resident`` (a teacher built before that)."""
        if measured is None:
            return None
        seconds, peak = measured
        return seconds, peak - base + resident

    if "save" in kinds:  # the pretrain model after one step (its optimizer state exists), saved sync and async
        ddp, opt = bench.trained(lm, bf16)
        bench.stepper(ddp, opt, lm, batches, seq, mbs)(0)
        save_stall(args.save_stall, ddp, opt, bench.sync)
        del ddp, opt
    if "pretrain" in kinds or "kd" in kinds:
        base = allocated_gib()
        ddp, opt = bench.trained(lm, bf16)
        if "pretrain" in kinds:
            record("pretrain", own(bench.measure(ddp, opt, lm, batches, seq, mbs, f"{combo} pretrain"), base),
                   teacher=False)
        teacher = bench.teacher(bf16)
        if "kd" in kinds:
            kd = kd_task(lm, teacher, chunk, e.kd_temperature)
            record("kd", own(bench.measure(ddp, opt, kd, batches, seq, mbs, f"{combo} kd"), base), teacher=True)
        del ddp, opt
        gc.collect()  # what Python holds of the plain student (its tensors may stay allocated: see own())
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if "elastic" in kinds:
        teacher = teacher if teacher is not None else bench.teacher(bf16)
        task = ElasticTask(recipe, "stage1")
        base = allocated_gib()
        ddp, opt = bench.trained(task, bf16)
        task.attach([ddp], teacher, device)
        resident = parameter_bytes([teacher]) / 2**30
        record("elastic", own(bench.measure(ddp, opt, task, batches, seq, mbs, f"{combo} elastic"), base, resident),
               teacher=True)
        del ddp, opt, task
    del teacher
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    parallel.shutdown()


def save_stall(where: str, ddp, opt, sync) -> None:
    """How long a checkpoint save (model + optimizer, as the Trainer saves) stalls training, synchronous vs
    ``checkpointing.async_save`` (megatron's async dist-checkpoint save), and when the async write finished."""
    import shutil
    import tempfile

    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    from pipeline.training import checkpoint

    for mode in ("sync", "async"):
        root = tempfile.mkdtemp(prefix=f"save_{mode}_", dir=where)
        queue = AsyncCallsQueue() if mode == "async" else None
        sync()
        start = time.perf_counter()
        checkpoint.save(root, 1, [ddp], opt, None, {}, async_queue=queue)
        sync()
        stall = time.perf_counter() - start
        done = ""
        if queue is not None:
            queue.maybe_finalize_async_calls(blocking=True)
            queue.close()
            done = f", written and finalised after {time.perf_counter() - start:.2f} s"
        print(f"  checkpoint save ({mode}): step stall {stall:.2f} s{done}", flush=True)
        shutil.rmtree(root, ignore_errors=True)


def combo_of(row) -> tuple:
    return row["variant"], row["backend"], row["precision"], row["seq"], row["mbs"]


def parse_variant(text: str):
    """``NAME:key=value,key=value`` -> (NAME, [overrides])."""
    name, _, rest = text.partition(":")
    if not name or not rest:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME:key.path=value[,key.path=value]")
    return name, rest.split(",")


def ratio(rows, combo, num: str, den: str, key: str = "seconds"):
    a = [r for r in rows if combo_of(r) == combo and r["step"] == num]
    b = [r for r in rows if combo_of(r) == combo and r["step"] == den]
    return a[0][key] / b[0][key] if a and b else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=os.path.join(ROOT, "recipes", "proxy_1b.yaml"))
    ap.add_argument("--combos", default="", help="backend:precision,... (default: what this machine runs: "
                    "local:bf16,te:bf16,te:fp8 on a Hopper GPU with TE; local:fp32 on CPU)")
    ap.add_argument("--micro-batches", type=int, default=2, help="micro-batches per step (the recipe's 8 x 4096 "
                    "tokens per step at micro-batch size 4 on one GPU)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, Triton autotuning)")
    ap.add_argument("--memory-seq", type=int, default=8192, help="elastic vs plain KD peak memory at this "
                    "sequence length (0: skip)")
    ap.add_argument("--save-stall", default="", metavar="DIR", help="also time a checkpoint save of the pretrain "
                    "model + optimizer into DIR, synchronous vs checkpointing.async_save (first combination, after the "
                    "timed steps)")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="after every timed step, a profiling pass: "
                    "per step kind the operators it dispatches and its host syncs by source line, its GPU-busy share "
                    "of the wall time, and the N most expensive kernels and host operators")
    ap.add_argument("--micro-batch-sizes", default="", metavar="N,M", help="micro-batch sizes to time, each with "
                    "--micro-batches micro-batches (default: the recipe's stage-1 size): a step bound by the host's "
                    "launches gains tokens/s with larger micro-batches, one bound by the GPU does not")
    ap.add_argument("--variant", action="append", default=[], type=parse_variant, metavar="NAME:k=v[,k=v]",
                    help="also time every combination with these recipe overrides, side by side with the recipe "
                    "(e.g. fused:model.moe_fused_grouped_mlp=true); repeatable")
    ap.add_argument("--json", default="", help="also write every measured row to this file")
    ap.add_argument("overrides", nargs="*", metavar="key.path=value")
    args = ap.parse_args()
    try:
        base = load_recipe(args.recipe, args.overrides)
    except UserError as e:
        sys.exit(f"error: {e}")
    combos = [c.split(":") for c in (args.combos or default_combos()).split(",")]
    t = base.stage1.training
    seq, mbs = t.seq_length, t.micro_batch_size
    sizes = [int(n) for n in args.micro_batch_sizes.split(",")] if args.micro_batch_sizes else [mbs]
    print(f"{os.path.basename(args.recipe)} | {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}"
          f" | {args.micro_batches} micro-batches x {'/'.join(map(str, sizes))} x {seq} tokens per step | median of "
          f"{args.steps} steps after {args.warmup}", flush=True)
    rows, failed = [], []
    start = time.perf_counter()
    first = True
    for variant, extra in [("recipe", [])] + args.variant:
        for backend, precision in combos:
            for size in sizes:  # Triton autotunes once per shape: later combinations warm up less
                failed.append(run_combo(args, args.overrides + extra, backend, precision, seq, size,
                                        ("pretrain", "kd", "elastic"), rows,
                                        args.warmup if first else min(args.warmup, 1), variant))
                first = False
    if args.memory_seq:
        backend, precision = combos[-1] if combos[-1][1] != "fp8" else combos[min(1, len(combos) - 1)]
        long_mbs = max(1, mbs * seq // args.memory_seq)
        failed.append(run_combo(args, args.overrides, backend, precision, args.memory_seq, long_mbs,
                                ("kd", "elastic"), rows, min(args.warmup, 1)))
    if args.save_stall:  # after the timed steps: the async writer's process must not share their time
        backend, precision = combos[0]
        failed.append(run_combo(args, args.overrides, backend, precision, seq, mbs, ("save",), rows, 1))
    if args.profile:  # after every timed step: the profiler leaves per-launch overhead behind in this process
        print(f"\nprofiling pass: where each step's time goes ({args.profile} rows per table)", flush=True)
        for backend, precision in combos:
            failed.append(run_combo(args, args.overrides, backend, precision, seq, mbs, ("pretrain", "kd", "elastic"),
                                    rows, 1, profiling=True))
    failed = [f for f in failed if f]
    print(f"\nsummary ({time.perf_counter() - start:.0f} s):")
    print("| variant | backend | precision | seq | micro-batch | pretrain tok/s | MFU | KD tok/s | MFU | "
          "elastic tok/s | MFU | KD / pretrain step | elastic / KD step | peak GiB pretrain / KD / elastic |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for combo in dict.fromkeys(combo_of(r) for r in rows):
        by = {r["step"]: r for r in rows if combo_of(r) == combo}
        cell = lambda k, f: (f.format(by[k]["tokens_per_s"]) if f.startswith("{:,") else f.format(by[k]["mfu"])) \
            if k in by else "-"  # noqa: E731
        peaks = " / ".join(f"{by[k]['peak_gib']:.1f}" if k in by else "-" for k in ("pretrain", "kd", "elastic"))
        print(f"| {combo[0]} | {combo[1]} | {combo[2]} | {combo[3]} | {combo[4]} | {cell('pretrain', '{:,.0f}')} "
              f"| {cell('pretrain', '{:.1%}')} "
              f"| {cell('kd', '{:,.0f}')} | {cell('kd', '{:.1%}')} | {cell('elastic', '{:,.0f}')} "
              f"| {cell('elastic', '{:.1%}')} | {ratio(rows, combo, 'kd', 'pretrain'):.3f} "
              f"| {ratio(rows, combo, 'elastic', 'kd'):.3f} | {peaks} |")
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"recipe": args.recipe, "device": torch.cuda.get_device_name() if torch.cuda.is_available()
                       else "cpu", "micro_batches": args.micro_batches, "rows": rows}, f, indent=1)
    for combo in dict.fromkeys(combo_of(r) for r in rows):
        mem = ratio(rows, combo, "elastic", "kd", "peak_gib")
        if mem == mem:  # not nan
            print(f"peak memory elastic / plain KD at seq {combo[3]}, micro-batch {combo[4]} ({combo[1]} {combo[2]}, "
                  f"{combo[0]}): {mem:.3f}")
    if failed:
        sys.exit("failed: " + "; ".join(failed))


if __name__ == "__main__":
    main()
