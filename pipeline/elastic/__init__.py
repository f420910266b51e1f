"""Everything elastic in one package: importance and permutation, nested masks, the router, the budget loss,
KD, the resolved per-budget subnets and slicing. Model construction stays in ``pipeline.model``."""
