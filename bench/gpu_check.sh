#!/usr/bin/env bash
# The GPU check in one device call (bench/gpu_check.py says what it measures):
#
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# .whl comes from `make gpu-wheels` (bench/gpu_wheels.py: a faiss GPU build pruned to sm_90, ~60 MB).
# Here, before any device call:  bash bench/gpu_check.sh --dry-run   (tiny sizes on the CPU, ~1-2 min).
# Every other argument goes to gpu_check.py (--only STEP ..., --budget SECONDS, --set KEY=VALUE).
# Figures: $OUT/gpu_check.json, the log: $OUT/gpu_check.log. Wall time on the device: under 8 minutes (--budget 450 for the steps).
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
DRY=0
for arg in "$@"; do [ "$arg" = --dry-run ] && DRY=1; done
if [ "$DRY" = 1 ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
SITE=${GLR_GPU_SITE:-/tmp/site}
SITE_ARGS=()
if [ "$DRY" = 0 ]; then
  # each candidate in its own folder: a bundle per .tar.xz, all plain wheels together (one version of each)
  for t in .whl/*.tar.xz; do
    [ -f "$t" ] || continue
    d="$SITE/$(basename "$t" .tar.xz)"
    mkdir -p "$d" && tar -xJf "$t" -C "$d" && echo "unpacked $t into $d ($(du -sm "$d" | cut -f1) MB)"
  done
  if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE/wheels" .whl/*.whl \
      && echo "installed $(ls .whl/*.whl | wc -l) wheel(s) into $SITE/wheels" || echo "pip install of .whl/*.whl failed"
  fi
  [ -d "$SITE" ] && SITE_ARGS=(--site "$SITE")
  # the machine's CUDA 13 libraries (its torch's nvidia wheels), for a faiss build that links them
  NV=$($PY -c 'import glob, os, site; print(":".join(sorted({d for s in site.getsitepackages() for d in glob.glob(os.path.join(s, "nvidia", "*", "lib"))})))' 2>/dev/null)
  export LD_LIBRARY_PATH="${NV}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader
fi
export PYTHONPATH="$PWD/lib${PYTHONPATH:+:$PYTHONPATH}"
$PY bench/gpu_check.py --out "$OUT" "${SITE_ARGS[@]}" "$@" 2>&1 | tee "$OUT/gpu_check.log"
