#!/bin/bash
# Issue 10's GPU checks as one device call, in the order they matter, each step within
# its own time limit so a slow one cannot eat the rest. What a step learns is written
# under $OUT as soon as it ends (logs, pytest's JUnit XML, benchmarks/RESULTS.md).
#
# On the GPU machine, from the project root (after `bash ../shared/gpu/pack` here):
#   bash .gpu/run bash benchmarks/gpu_check.sh    # tests, then MiniLM: fits one 600 s call
#   STEPS=bench-bert bash .gpu/run bash benchmarks/gpu_check.sh
# Steps: tests, bench-minilm, bench-bert, bench-llm (precision, score, generate).
# ROWS (default 1,000,000) and DEVICE (default cuda; cpu with small ROWS checks the
# script itself) pass on to gpu_embed.py.
set -u
out=${OUT:-/tmp/out}
mkdir -p "$out"
steps=${STEPS:-tests bench-minilm}
bench=(python benchmarks/gpu_embed.py --device "${DEVICE:-cuda}" --rows "${ROWS:-1000000}")

step() {  # step NAME SECONDS COMMAND...
  local name=$1 secs=$2
  shift 2
  echo "== $name (at most ${secs}s): $*"
  timeout "$secs" "$@" >"$out/$name.log" 2>&1
  echo "rc=$?" >>"$out/$name.log"
  tail -4 "$out/$name.log"
  cp benchmarks/RESULTS.md "$out/RESULTS.md"
}

nvidia-smi >"$out/nvidia-smi.txt" 2>&1
for s in $steps; do
  case $s in
    tests) step tests 240 python -m pytest -m gpu -q -p no:cacheprovider \
      --junitxml="$out/gpu-tests.xml" tests/test_gpu.py tests/test_host_side.py ;;
    bench-minilm) step bench-minilm 340 "${bench[@]}" --only embed --embed-models minilm ;;
    bench-bert) step bench-bert 570 "${bench[@]}" --only embed --embed-models bertbase ;;
    bench-llm) step bench-llm 570 "${bench[@]}" --only precision,score,generate ;;
    *) echo "unknown step $s" >&2; exit 2 ;;
  esac
done
