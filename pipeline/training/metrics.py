"""Throughput, MFU, memory and ETA for the training log line; TensorBoard and metrics.jsonl writers."""

from __future__ import annotations

import json
import os
import resource
import time
from typing import Dict, Optional

import torch

from pipeline.config.schema import ModelConfig
from pipeline.model.params import Dims, count_parameters

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "B200": 2250.0, "A100": 312.0}


def flops_per_token(m: ModelConfig, seq_length: int, teacher_forward: bool = False) -> float:
    """FLOPs per token of one training step, what runs (docs/throughput.md): the student's forward + backward,
    6 x active matmul parameters + causal attention scores (2 x for the forward, 4 x for the backward), and with
    ``teacher_forward`` (KD, the elastic stages) the frozen teacher's forward, 2 x its matmul parameters + its
    forward attention (a third of the student's count: +1/3 in total).

    The input embedding is a lookup (no FLOPs); the Mamba SSD scan itself is not counted (it is small
    next to its projections), so MFU is slightly underestimated on Mamba-heavy models. The elastic student runs
    the full-size masked model whatever budget is sampled, so it counts as the parent (skipped layers aside).
    """
    c = count_parameters(m.pattern, Dims.from_model(m))
    matmul_params = c.active - m.vocab_size * m.hidden_size
    attn_width = m.num_attention_heads * m.attention_head_dim
    attention = 6 * m.pattern.count("*") * seq_length * attn_width  # QK^T and AV, causal half, x3 for bwd
    student = 6 * matmul_params + attention
    return student + (student / 3 if teacher_forward else 0.0)


def peak_tflops(configured: float) -> float:
    if configured > 0:
        return configured
    if not torch.cuda.is_available():
        return 0.0
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), 0.0)


def memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS (KiB on Linux)


def fmt_eta(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class StepTimer:
    """Average step time over the current logging window (first step after start excluded from ETA)."""

    def __init__(self):
        self.window_start = time.perf_counter()
        self.window_steps = 0

    def tick(self) -> None:
        self.window_steps += 1

    def take(self) -> float:
        now = time.perf_counter()
        avg = (now - self.window_start) / max(self.window_steps, 1)
        self.window_start, self.window_steps = now, 0
        return avg


class MetricsWriter:
    """metrics.jsonl (every step, for exact-resume checks and plots) and TensorBoard (optional)."""

    def __init__(self, stage_dir: str, tensorboard: bool, resume_step: int = 0):
        os.makedirs(os.path.join(stage_dir, "logs"), exist_ok=True)
        path = os.path.join(stage_dir, "logs", "metrics.jsonl")
        truncate_metrics(path, resume_step)
        self.jsonl = open(path, "a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(stage_dir, "tb"))

    def write(self, step: int, values: Dict[str, float]) -> None:
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.tb:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.jsonl.close()
        if self.tb:
            self.tb.close()


def truncate_metrics(path: str, last_step: int) -> None:
    """Drop the records after ``last_step`` (the checkpoint a run resumes from): the resumed run writes those
    steps again, so the file keeps one record per step. A torn last line (a killed writer) goes too."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def read_metrics(stage_dir: str) -> Dict[int, Dict[str, float]]:
    """Last record per step (a resumed run rewrites the steps after its checkpoint)."""
    out: Dict[int, Dict[str, float]] = {}
    path = os.path.join(stage_dir, "logs", "metrics.jsonl")
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            out[rec["step"]] = rec
    return out


def log_line(step: int, total: int, values: Dict[str, float], extra: Optional[str] = None) -> str:
    parts = [f"step {step}/{total}"]
    for key, fmt in (("loss", "{:.4f}"), ("grad_norm", "{:.3f}"), ("lr", "{:.2e}"),
                     ("tokens_per_s_per_gpu", "{:,.0f}"), ("tflops_per_gpu", "{:.1f}"), ("mfu", "{:.1%}"),
                     ("mem_gib", "{:.2f}")):
        if key in values:
            label = {"tokens_per_s_per_gpu": "tok/s/gpu", "mem_gib": "mem GiB",
                     "tflops_per_gpu": "TFLOP/s/gpu"}.get(key, key.replace("_", " "))
            parts.append(f"{label} {fmt.format(values[key])}")
    if extra:
        parts.append(extra)
    return " | ".join(parts)
