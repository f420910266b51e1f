"""Nested FP8 PTQ and NVFP4 QAD of the elastic checkpoint (docs/qad.md)."""
