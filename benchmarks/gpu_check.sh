#!/usr/bin/env bash
# One command for a GPU machine (under 8 minutes): the CUDA tests (with AMP bf16 / fp16
# training steps), bench_train_gpu.py (BoT R50 256x128 batch 64: fp32 eager vs bf16 +
# channels_last vs + torch.compile, images/s and peak memory) and bench_loader.py
# (per-sample vs batched on CPU vs batched on CUDA), gathered into one JSON of figures.
#
#   bash benchmarks/gpu_check.sh [OUT_JSON]
#
# OUT_JSON defaults to $OUT/gpu_check.json when $OUT is set, else ./gpu_check.json.
# Uses .venv when it already has a CUDA torch, else creates / completes it from PyPI only
# (TORCH_SPEC, default the Makefile's torch==2.13.0; the PyPI Linux wheels are CUDA
# builds). Exit status: non-zero when a test failed or a step could not run.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if [ $# -ge 1 ]; then OUT_JSON=$1; elif [ -n "${OUT:-}" ]; then OUT_JSON=$OUT/gpu_check.json; else OUT_JSON=$ROOT/gpu_check.json; fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
export PYTHONUNBUFFERED=1 REIDKIT_REQUIRE_CUDA=1
unset PIP_FIND_LINKS  # PyPI only: no local (CPU-only) wheel folders

step() { echo "== [$(( $(date +%s) - START )) s] $*"; }

# ---------------------------------------------------------------- environment
step "python environment"
if ! .venv/bin/python -c "import torch, reidkit, pytest, hypothesis; assert torch.cuda.is_available()" 2>/dev/null; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv || { echo "cannot create .venv"; exit 2; }
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "$TORCH_SPEC" || .venv/bin/python -m pip install -q torch \
    || { echo "cannot install torch from PyPI"; exit 2; }
  .venv/bin/python -m pip install -q -e . pytest hypothesis simplejpeg || { echo "cannot install reidkit"; exit 2; }
fi
.venv/bin/python - <<'PYEOF' > "$WORK/env.json"
import json, subprocess, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}")
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except Exception as exc:
    info["nvidia_smi"] = f"unavailable: {exc}"
print(json.dumps(info))
PYEOF
cat "$WORK/env.json"
STATUS=0

# ------------------------------------------------------------------ CUDA tests
step "CUDA tests (tests/test_cuda.py + the CUDA cases of metrics / batch transforms)"
timeout 240 .venv/bin/python -m pytest -q -p no:cacheprovider --junitxml="$WORK/tests.xml" \
  tests/test_cuda.py tests/test_metrics.py::test_cuda_matches_cpu \
  tests/test_batch_transforms.py::test_cuda_matches_cpu 2>&1 | tee "$WORK/tests.log" | tail -n 25
[ "${PIPESTATUS[0]}" -eq 0 ] || STATUS=1

# --------------------------------------------------------- training benchmark
step "bench_train_gpu.py: fp32 eager, bf16 + channels_last"
timeout 150 .venv/bin/python benchmarks/bench_train_gpu.py --no-compile --json "$WORK/train.json" || STATUS=1
step "bench_train_gpu.py: + torch.compile"
timeout 200 .venv/bin/python benchmarks/bench_train_gpu.py --only bf16+channels_last+compile \
  --json "$WORK/train_compile.json" || echo "compile variant did not finish (timeout or error)"

# ----------------------------------------------------------- loader benchmark
step "bench_loader.py: per-sample vs batched CPU vs batched CUDA"
timeout 150 .venv/bin/python benchmarks/bench_loader.py --num-images 1024 --num-workers 0 4 \
  --rounds 3 --threads 4 --json "$WORK/loader.json" || STATUS=1

# ---------------------------------------------------------------- one JSON
step "writing $OUT_JSON"
mkdir -p "$(dirname "$OUT_JSON")"
.venv/bin/python - "$WORK" "$OUT_JSON" "$STATUS" "$START" <<'PYEOF'
import json, sys, time, xml.etree.ElementTree as ET
from pathlib import Path
work, out, status, start = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def load(name):
    p = work / name
    return json.loads(p.read_text()) if p.is_file() else None
tests = {}
if (work / "tests.xml").is_file():
    root = ET.parse(work / "tests.xml").getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    tests = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    tests["failed_cases"] = [
        f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
        if c.find("failure") is not None or c.find("error") is not None
    ]
log = (work / "tests.log").read_text() if (work / "tests.log").is_file() else ""
tests["log_tail"] = log[-3000:]
train = load("train.json") or {}
compiled = load("train_compile.json")
if compiled:
    train.setdefault("variants", {}).update(compiled.get("variants", {}))
    base = train["variants"].get("fp32", {})
    for name, r in train["variants"].items():
        if name != "fp32" and "train_img_s" in r and "train_img_s" in base:
            r["train_speedup"] = r["train_img_s"] / base["train_img_s"]
            r["extract_speedup"] = r["extract_img_s"] / base["extract_img_s"]
figures = {
    "env": load("env.json"),
    "tests": tests,
    "train_gpu": train,
    "loader": load("loader.json"),
    "ok": status == 0,
    "duration_s": round(time.time() - start, 1),
}
out.write_text(json.dumps(figures, indent=2))
print(json.dumps({k: figures[k] for k in ("ok", "duration_s")}), "->", out)
PYEOF
step "done (status $STATUS)"
exit $STATUS
