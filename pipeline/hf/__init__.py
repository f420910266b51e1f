"""Hugging Face NemotronH interop: config and tensor mapping, streaming safetensors and dist-checkpoint I/O.

``importer.import_hf`` and ``exporter.export_hf`` are the two entry points (the ``import`` / ``export``
stages are thin CLI wrappers); ``mapping`` and ``config`` are reusable by later exporters (slicing).
"""
