"""Launchers: the same ``python -m pipeline <stage>`` command locally (local.sh), on SLURM (slurm/) or through
nemo-run (nemo_run.py). They only build command lines and job scripts; the stages live in ``pipeline``."""
