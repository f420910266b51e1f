"""Mask arithmetic that keeps no activation copy of its own for the backward.

A mask or scale that carries the router's gradient makes autograd keep the tensor it multiplies (for that
gradient) beside the product, which the next module keeps too (for its own backward): every masked activation
held twice. On the 1.1B proxy that is ~8 GiB per 16K-token micro-batch. Two ways around it, exact in value:

- ``scaled``: ``y * s`` for a positive scalar ``s`` keeps the product and recovers ``y`` as ``product / s`` in the
  backward (the product is what the next module keeps anyway);
- ``masked_input``: ``x * m`` for a per-channel mask ``m`` (zeros included, so ``x`` cannot be recovered from the
  product) keeps ``x`` for the mask's gradient, and the consumer that would keep the product keeps a recipe
  instead — ``x`` and ``m`` — and recomputes the product in its backward (one elementwise multiply).

Inside a ``masked_input`` block autograd does not check saved tensors for in-place changes (PyTorch skips that
check for tensors packed by hooks): the block holds one module's forward (a linear, a norm kernel), which changes
nothing in place. ``SAVE_MEMORY = False`` gives the plain autograd forms (the tests' reference).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

SAVE_MEMORY = True


class _Scaled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, s):
        out = y * s.to(y.dtype)
        ctx.save_for_backward(out, s)
        return out

    @staticmethod
    def backward(ctx, grad):
        out, s = ctx.saved_tensors
        grad_y = grad * s.to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:  # d(y s)/ds = y = out / s (s > 0: the share of kept channels)
            grad_s = ((grad.float() * out.float()).sum() / s.float()).to(s.dtype).reshape(s.shape)
        return grad_y, grad_s


def scaled(y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``y * s`` (``s`` a positive scalar tensor) that keeps only the product for the backward."""
    if not SAVE_MEMORY or not torch.is_grad_enabled() or s.numel() != 1:
        return y * s.to(y.dtype)
    return _Scaled.apply(y, s)


class _Product:
    """The recipe of one masked product, shared by every saved view of it: recomputed once in the backward, and
    released with the last view that autograd keeps."""

    __slots__ = ("x", "m", "full")

    def __init__(self, x, m):
        self.x, self.m, self.full = x, m, None

    def view(self, layout) -> torch.Tensor:
        if self.full is None:
            self.full = self.x * self.m  # the same op on the same inputs: bit for bit, same strides
        return self.full.as_strided(*layout)


class _SavedView:
    __slots__ = ("product", "layout")

    def __init__(self, product: _Product, layout):
        self.product, self.layout = product, layout


def _storage(t: torch.Tensor):
    """(storage pointer, dtype) of a plain tensor; None for subclasses (TE's FP8 tensors may have no storage of
    their own, and the product, a plain ``x * m``, is never one)."""
    return (t.untyped_storage().data_ptr(), t.dtype) if type(t) is torch.Tensor else None


@contextmanager
def masked_input(x: torch.Tensor, m: torch.Tensor):
    """Yields ``x * m``; inside the block, a module that saves that product, or views of it (TE's grouped
    linears keep one slice per expert), saves ``(x, m)`` and the view's layout instead and recomputes the product
    in its backward. Use it around the one consumer of the product."""
    product = x * m
    if not SAVE_MEMORY or not torch.is_grad_enabled():
        yield product
        return

    # the hooks live as long as the saved tensors (autograd keeps both): they must not hold the product itself
    storage = _storage(product)
    recipe = _Product(x, m)

    def pack(t):
        if storage is None or _storage(t) != storage:
            # a detached alias (same storage, same version counter): returning ``t`` itself would tie a saved
            # output to its own graph node, a cycle that outlives a forward never followed by its backward
            return t.detach()
        return _SavedView(recipe, (tuple(t.shape), t.stride(), t.storage_offset()))

    def unpack(saved):
        return saved.product.view(saved.layout) if isinstance(saved, _SavedView) else saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield product
