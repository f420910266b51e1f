"""Throughput of the fused Triton fake-quant kernels vs the GPU's copy bandwidth and modelopt's Triton kernel.

    python bench/bench_fake_quant.py                    # H200: bf16 weights / activations of proxy and Nano sizes

A quantise-dequantise reads and writes every element once, like a copy: its bandwidth is 2 x bytes / time,
reported against a measured device-to-device copy of the same tensor (``torch.Tensor.copy_``) and against the
H200's 4.3 TB/s. modelopt's ``fp4_fake_quant_block`` (Hopper) runs on the same tensors for the speed ratio.
Forward only (the weight's backward is a pass-through; the activation's STE is one more elementwise pass).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

H200_COPY_TBPS = 4.3
SHAPES = [(2048, 2048), (4096, 2048), (8192, 2688), (1856, 2688), (16384, 4096), (32768, 2688)]


def _time(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    args = ap.parse_args()
    from te_kernels import quant_triton

    try:
        from modelopt.torch.kernels.quantization.gemm.fp4_kernel_hopper import fp4_fake_quant_block
    except ImportError:
        fp4_fake_quant_block = None
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    print(f"device {torch.cuda.get_device_name()} | {args.dtype} | bandwidth = 2 x tensor bytes / time")
    print(f"{'shape':>14} {'copy TB/s':>9} {'nvfp4 TB/s':>10} {'of copy':>7} {'of 4.3':>6} {'fp8 TB/s':>8} "
          f"{'of copy':>7} {'modelopt TB/s':>13} {'ours/modelopt':>13}")
    for shape in SHAPES:
        x = torch.randn(shape, dtype=dtype, device="cuda")
        amax = x.float().abs().amax()
        nbytes = 2 * x.numel() * x.element_size()
        out = torch.empty_like(x)
        copy = nbytes / _time(lambda: out.copy_(x), args.repeats) / 1e12
        nv = nbytes / _time(lambda: quant_triton.fake_quant(x, amax, "nvfp4"), args.repeats) / 1e12
        f8 = nbytes / _time(lambda: quant_triton.fake_quant(x, amax, "fp8"), args.repeats) / 1e12
        mo = (nbytes / _time(lambda: fp4_fake_quant_block(x, amax), args.repeats) / 1e12
              if fp4_fake_quant_block else float("nan"))
        print(f"{str(tuple(shape)):>14} {copy:>9.2f} {nv:>10.2f} {nv / copy:>7.1%} {nv / H200_COPY_TBPS:>6.1%} "
              f"{f8:>8.2f} {f8 / copy:>7.1%} {mo:>13.2f} {nv / mo:>13.2f}")


if __name__ == "__main__":
    main()
