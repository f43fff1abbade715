#!/bin/bash
# After `bash ../shared/gpu/pack`, on the development machine: the wheels Ray Serve
# imports that the GPU machine lacks (fastapi, starlette, uvicorn, opentelemetry-api,
# grpcio-reflection: the second H200 call's Serve test failed without it), and grpcio
# itself, since grpcio-reflection's generated code refuses an older grpcio (the
# machine's 1.84.0 failed the third call's Serve test), and tokenizers, whose 0.23.2
# there drops a cut text's overflowing pieces (lmbatch refuses it),
# at the versions in .venv, into .gpu/wheels, which `.gpu/run` installs there. Without
# them `tests/test_gpu.py`'s Serve test cannot import `ray.serve`.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
py=${PY:-.venv/bin/python}
for p in fastapi starlette uvicorn opentelemetry-api grpcio grpcio-reflection tokenizers; do
  v=$($py -c "import importlib.metadata as m; print(m.version('$p'))")
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d .gpu/wheels "$p==$v" 2>&1 |
    grep -v '^WARNING' || true
done
ls .gpu/wheels
