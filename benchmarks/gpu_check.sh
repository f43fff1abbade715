#!/bin/bash
# Issue 10's GPU checks as one device call, in the order they matter. Each step runs
# within its own time limit and within the call's deadline (END, epoch seconds), so a
# slow step cannot eat the rest and the call ends before the device tool stops it.
# What a step learns is written under $OUT as soon as it ends (tests.log, bench.log,
# pytest's JUnit XML, benchmarks/RESULTS.md, env.txt); gpu_embed.py prints each run's
# line as it ends.
#
# On the GPU machine, from the project root (after `bash ../shared/gpu/pack` here):
#   END=$(( $(date +%s) + 570 )) bash .gpu/run bash benchmarks/gpu_check.sh
#   STEPS="bench-bert llm" bash .gpu/run bash benchmarks/gpu_check.sh
# Steps: tests, bench-minilm, precision-bert, ceiling (MiniLM without its layers),
# actors-minilm, pool-minilm (lmbatch alone with POOL_SIZES actors a GPU, default
# auto,4), actors-bert (the same for BERT-base, default auto), precision-llama,
# bench-bert, llm (score and generate). ROWS (default 1,000,000), PREC_ROWS (BERT-base
# rows per precision, default 100,000) and DEVICE (default cuda; cpu with small ROWS
# checks the script itself) pass on to gpu_embed.py. TESTS, a pytest -k expression,
# runs part of the tests step when a call is short; TEST_SECS (default 200) limits it.
set -u
out=${OUT:-/tmp/out}
mkdir -p "$out"
steps=${STEPS:-tests bench-minilm precision-bert ceiling actors-minilm precision-llama}
end=${END:-$(($(date +%s) + 3600))}
bench=(python benchmarks/gpu_embed.py --device "${DEVICE:-cuda}" --rows "${ROWS:-1000000}"
  --precision-rows "${PREC_ROWS:-100000}")

step() { # step NAME SECONDS COMMAND...
  local name=$1 secs=$2 left=$((end - $(date +%s)))
  shift 2
  if ((left < 30)); then
    echo "== $name: skipped, ${left}s left before the deadline"
    return
  fi
  ((secs > left)) && secs=$left
  # One log for the tests, one for every benchmark: a call brings back 8 files at most.
  local log=$out/bench.log
  [[ $name == tests ]] && log=$out/tests.log
  echo "== $name (at most ${secs}s): $*" | tee -a "$log"
  # SIGINT, as Ctrl-C: pytest prints what failed so far, lmbatch stops its Ray.
  timeout -s INT -k 20 "$secs" "$@" >>"$log" 2>&1
  echo "rc=$?" >>"$log"
  tail -8 "$log"
  cp benchmarks/RESULTS.md "$out/RESULTS.md"
}

# Every file's gpu tests: test_gpu.py holds most; stop strings, sampling and text pairs
# keep theirs beside their CPU tests. A test stuck on CUDA fails alone rather than
# taking the step's whole limit; tests run in parallel workers (each its own local
# Ray) where pytest-xdist is installed.
per_test=()
python -c "import pytest_timeout" 2>/dev/null && per_test+=(--timeout=90)
python -c "import xdist" 2>/dev/null && per_test+=(-n "${TEST_WORKERS:-6}")
TEST_SECS=${TEST_SECS:-200}
# An actor's import of torch and transformers took 13-14 s on the H200 machine. This
# sandbox sets PYTHONDONTWRITEBYTECODE=1 and .gpu/run installs Ray and the project
# without bytecode; where that holds, every process compiles what it imports (on the
# 2-core CPU machine: import ray.data 7.3-8.5 s against 2.3 s, the actor's imports
# 28.5 s against 11.5 s). So: say what the machine has, then compile it all once.
imports() {
  local TIMEFORMAT=%R
  { time python -c "import torch, transformers.modeling_utils, ray.data"; } 2>&1 | tail -1
}
package_dir() { python -c "import $1; print(list($1.__path__)[0])"; }
where=$(package_dir transformers)
{
  nvidia-smi
  python -m pip list 2>/dev/null |
    grep -iE '^(torch|transformers|tokenizers|ray|bitsandbytes|sentence-transformers) '
  echo "PYTHONDONTWRITEBYTECODE=${PYTHONDONTWRITEBYTECODE-unset}; transformers at $where:" \
    "$(find "$where" -name '*.pyc' | wc -l) .pyc files, $([[ -w $where ]] || echo 'not ')writable"
  echo "import torch, transformers.modeling_utils, ray.data: $(imports) s"
} >"$out/env.txt" 2>&1
unset PYTHONDONTWRITEBYTECODE
[[ -w $where ]] || export PYTHONPYCACHEPREFIX=/tmp/pycache
compiled=$(
  TIMEFORMAT=%R
  { time python -m compileall -q -j 0 "$where" "$(package_dir torch)" \
    "$(package_dir ray)" "$(package_dir lmbatch)" >/dev/null 2>&1; } 2>&1 | tail -1
)
echo "bytecode written in ${compiled} s; then the same import: $(imports) s" >>"$out/env.txt"
for s in $steps; do
  case $s in
    tests) PYTHONPATH=benchmarks:${PYTHONPATH:-} step tests "$TEST_SECS" python -m pytest -m gpu -q \
      -rfE --tb=short -p no:cacheprovider -p pytest_instafail "${per_test[@]}" \
      --junitxml="$out/gpu-tests.xml" ${TESTS:+-k "$TESTS"} tests ;;
    bench-minilm) step bench-minilm 330 "${bench[@]}" --only embed --embed-models minilm ;;
    precision-bert) step precision-bert 200 "${bench[@]}" --only precision \
      --precision-models bertbase ;;
    ceiling) step ceiling 150 "${bench[@]}" --only ceiling ;;
    actors-minilm) step actors-minilm 150 "${bench[@]}" --only actors --embed-models minilm ;;
    pool-minilm) step pool-minilm 200 "${bench[@]}" --only actors --embed-models minilm \
      --pool-sizes "${POOL_SIZES:-auto,4}" ;;
    precision-llama) step precision-llama 200 "${bench[@]}" --only precision \
      --precision-models llama1b ;;
    actors-bert) step actors-bert 200 "${bench[@]}" --only actors --embed-models bertbase \
      --pool-sizes "${POOL_SIZES:-auto}" ;;
    bench-bert) step bench-bert 570 "${bench[@]}" --only embed,actors --embed-models bertbase ;;
    llm) step llm 570 "${bench[@]}" --only score,generate ;;
    *) echo "unknown step $s" >&2; exit 2 ;;
  esac
done
