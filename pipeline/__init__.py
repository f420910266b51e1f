"""Star Elastic / Nemotron Elastic training pipeline on megatron-core."""

__version__ = "0.1.0"
