"""Importance estimation (METHOD §2): score every elastic axis on calibration data, then permute the parent
so every prefix of every axis holds its most important units (``pipeline.elastic.permute``).

- ``collect.py``  hooks on megatron-core modules and the Scores they produce
- ``stats.py``    running sums and their DP / TP / EP reduction
- ``reap.py``     REAP expert scores and per-expert FFN channels
- ``depth.py``    layers by iterative normalised-MSE removal
- ``orders.py``   scores -> orders (within KV / Mamba groups), prefix-share summary
- ``forward.py``  forward-only passes through megatron's pipeline schedule
- ``report.py``   importance.json + importance_tensors.pt
- ``run.py``      the stage: load, score, (depth), permute, save
"""
