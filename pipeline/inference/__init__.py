"""Inference on an elastic checkpoint: nested models as views of one set of weights, think-small / answer-large
budget control, and its evaluation (docs/budget_control.md)."""
