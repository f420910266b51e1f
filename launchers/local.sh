#!/usr/bin/env bash
# One stage on this machine: NPROC ranks through torchrun --standalone (a private rendezvous on localhost).
#   NPROC=2 launchers/local.sh pretrain --recipe recipes/tiny.yaml training.train_iters=20
# PY picks the interpreter (default: the repo's .venv if present). `make STAGE NPROC=N` runs the same command.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # `-m pipeline` from any directory
PY=${PY:-$([ -x "$repo/.venv/bin/python" ] && echo "$repo/.venv/bin/python" || echo python3)}
NPROC=${NPROC:-1}
if [ "$NPROC" = 1 ]; then
    exec "$PY" -m pipeline "$@"
fi
exec "$PY" -m torch.distributed.run --standalone --nproc-per-node="$NPROC" -m pipeline "$@"
