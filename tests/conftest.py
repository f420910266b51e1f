"""Shared test fixtures: the repo root, and running the CLI as users do (a subprocess, exit code + output)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "recipes", "tiny.yaml")
NANO = os.path.join(ROOT, "recipes", "nemotron_nano_v3_30b.yaml")


def cli_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(*args, timeout=600, check=False):
    """``python -m pipeline ARGS``; returns CompletedProcess with text stdout/stderr."""
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"pipeline {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def cli():
    return run_cli
