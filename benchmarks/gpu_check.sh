#!/usr/bin/env bash
# The GPU check: one command that, on a fresh GPU machine with torch, triton and nvcc but no
# package index, builds fastnin from source, runs the whole test suite on CUDA tensors (CUDA and
# Triton backends, all dtypes), runs compute-sanitizer over the CUDA parity tests, runs the GPU
# benchmarks, and writes benchmarks/results/<gpu>-<short commit>.{json,md}.
#
#   bash benchmarks/gpu_check.sh                 # from the repository root
#
# Env: FASTNIN_COMMIT (the commit to name in the results when .git is absent), OUT (a folder that
# also receives the logs and results), GPU_CHECK_SKIP (space-separated steps to skip:
# build tests sanitize bench), TORCH_CUDA_ARCH_LIST (default here: 9.0, the GPU at hand only).
# Budget: about 10 minutes on an H100 (build ~3, tests ~3, sanitizers ~1, benchmarks ~3).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/build/gpu-check}
LOG=$OUT/logs   # packed into $OUT/gpu-check-logs.tar.gz at the end
mkdir -p "$LOG" benchmarks/results
trap 'tar czf "$OUT/gpu-check-logs.tar.gz" -C "$OUT" logs && rm -rf "$LOG"' EXIT
export PYTHONUNBUFFERED=1
t0=$SECONDS
status=0
stamp() { echo "== [gpu-check +$((SECONDS - t0))s] $*"; }
skip() { [[ " ${GPU_CHECK_SKIP:-} " == *" $1 "* ]]; }
PY=${PYTHON:-python3}
# `python -m pytest` and `python -m fastnin.bench` put the current directory (this checkout) first
# on sys.path, so they imported ./fastnin, which has no compiled _C (pip installs it into
# site-packages): every step after the build failed at `import fastnin` (seen with torch 2.11 and
# Python 3.12, the GPU image's). PYTHONSAFEPATH=1 (Python >= 3.11) leaves the directory out; older
# Pythons get the extension built in place as well (below), so both copies import.
export PYTHONSAFEPATH=1

COMMIT=${FASTNIN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export FASTNIN_COMMIT=$COMMIT
stamp "commit $COMMIT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$LOG/nvidia-smi.txt"
$PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

if ! skip build; then
  stamp "build: pip install --no-build-isolation --no-deps ."
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  if ! $PY -m pip install --no-build-isolation --no-deps -v . >"$LOG/build.log" 2>&1; then
    tail -n 80 "$LOG/build.log"; stamp "BUILD FAILED"; exit 1
  fi
  grep -E "fastnin setup:" "$LOG/build.log"
  if ! $PY -c "import sys; sys.exit(sys.version_info < (3, 11))"; then
    stamp "Python < 3.11 (no PYTHONSAFEPATH): building in place too"
    $PY setup.py build_ext --inplace >>"$LOG/build.log" 2>&1 || { tail -n 40 "$LOG/build.log"; exit 1; }
  fi
  grep -E "spill|Used [0-9]+ registers" "$LOG/build.log" | sort | uniq -c | sort -rn | head -20 > "$LOG/ptxas.txt" || true
  so=$(cd /tmp && $PY -c "import fastnin._C as c; print(c.__file__)")
  cuobjdump --list-elf "$so" | tee "$LOG/elf.txt"
fi
(cd /tmp && $PY -c "import fastnin; print('backends', fastnin.available_backends())")

if ! skip tests; then
  stamp "tests: the whole suite (CUDA and Triton backends on CUDA tensors, all dtypes)"
  # xdist if present: 16 cores, one GPU; the tests are small.
  par=""; $PY -c "import xdist" 2>/dev/null && par="-n 8"
  timeout 420 $PY -m pytest tests -q -p no:cacheprovider $par -rfE --junitxml="$LOG/junit.xml" \
      >"$LOG/pytest.log" 2>&1
  rc=$?; tail -n 40 "$LOG/pytest.log"
  [ $rc -eq 0 ] || { status=1; stamp "TESTS FAILED (rc=$rc)"; }
fi

if ! skip tests; then
  stamp "large tensors: GAP and LRN over > 2^31 elements on the GPU (pytest -m slow tests/test_large.py)"
  timeout 300 $PY -m pytest tests/test_large.py -q -p no:cacheprovider -m slow -k "cuda" -rfEs \
      >"$LOG/pytest-large.log" 2>&1
  rc=$?; tail -n 15 "$LOG/pytest-large.log"
  [ $rc -eq 0 ] || { status=1; stamp "LARGE-TENSOR TESTS FAILED (rc=$rc)"; }
fi

if ! skip sanitize && command -v compute-sanitizer >/dev/null; then
  stamp "compute-sanitizer memcheck / racecheck over the small CUDA parity tests"
  for tool in memcheck racecheck; do
    timeout 150 compute-sanitizer --tool $tool --error-exitcode 99 --print-limit 20 \
        $PY -m pytest tests/test_cuda.py -q -p no:cacheprovider -m sanitize -x >"$LOG/sanitize-$tool.log" 2>&1
    rc=$?; tail -n 6 "$LOG/sanitize-$tool.log"
    [ $rc -eq 0 ] || { status=1; stamp "$tool FAILED (rc=$rc)"; }
  done
fi

if ! skip bench; then
  stamp "benchmarks: python -m fastnin.bench --device cuda --full"
  # --budget: every case is measured first without torch.compile, then max-autotune compile is
  # added case by case (those with a compile target first) until 220 s have passed; the results
  # files are rewritten after every case, so even a run cut by the timeout leaves them. The JUnit
  # file of the test step puts every parity failure into the results.
  # The chart only where matplotlib is installed (the GPU image may lack it; --plot then fails).
  plot=(); $PY -c "import matplotlib" 2>/dev/null && plot=(--plot "$OUT/speedups.png")
  timeout 300 $PY -m fastnin.bench --device cuda --full --budget 220 --no-progress --results-dir benchmarks/results \
      --pytest-junit "$LOG/junit.xml" "${plot[@]}" >"$LOG/bench.log" 2>&1
  rc=$?; tail -n 60 "$LOG/bench.log"
  [ $rc -eq 0 ] || { status=1; stamp "BENCH FAILED (rc=$rc)"; }
  cp benchmarks/results/*-"$COMMIT".* "$OUT"/ 2>/dev/null || true
fi
stamp "done, status $status"
exit $status
