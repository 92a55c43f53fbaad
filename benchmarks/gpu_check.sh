#!/usr/bin/env bash
# Issue 7's GPU figures in one call of about 6.5 minutes on one H100/H200: the sd-turbo
# architecture (random weights) at 512px, K = 50, the SDPO paper's batches (8 trajectories
# per sampling call, 2 pairs per training minibatch), per algorithm: trajectories/s,
# training transitions/s, peak memory (target <= 12 GB), training MFU against a bf16
# matmul timed in the same run, and the re-scored ratio drift in fp16 and bf16.
#
# The GPU machine has torch, transformers, peft and accelerate but neither diffusers nor
# tyro, and no package index: carry them as wheels (about 7 MB; the CLIP tokenizer comes
# from the repository's tiny-world folder, so open_clip is not needed). Once, on the CPU
# machine, in the repo root (.whl/ is git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform any -d .whl \
#     diffusers==0.42.1 tyro==1.0.17 docstring-parser typeguard importlib_metadata
# Then through the device tool: run(command="bash benchmarks/gpu_check.sh",
# carry=[".whl"], timeout_s=450). Everything lands in $OUT (tables.md, records.json,
# log.txt, env.txt); without $OUT (a plain shell) it goes to results/perf/gpu/latest.
# A dry run of the same sequence on a CPU, reduced (about 5 minutes on 2 cores):
#   PATH=$PWD/.venv/bin:$PATH OUT=/tmp/gpu-check \
#   PERF_EXTRA="--reduced --resolution 64 --steps 10 --batch-size 4" bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-results/perf/gpu/latest}
mkdir -p "$OUT/runs"
LOG="$OUT/log.txt"

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# perf TAG SECONDS FLAGS...: one setting, bounded so one slow setting cannot eat the rest.
perf() {
  local tag=$1 limit=$2
  shift 2
  echo "=== $tag (at ${SECONDS}s)" | tee -a "$LOG"
  # shellcheck disable=SC2086
  timeout "$limit" python3 -m benchmarks.perf --preset sd-turbo --tag "$tag" --out "$OUT/runs" \
    "$@" ${PERF_EXTRA:-} 2>&1 | grep -v "should be kept in float32" | tee -a "$LOG"
}

# Sized from the 2026-11-26 H100 run (results/perf/gpu/2026-11-26-h100): one algorithm
# with its per-member baselines takes ~45 s at --repeats 2 --sample-calls 1 (a sampling
# call of 8 trajectories at K = 50 ~3 s), a setting's start (random 866M UNet, matmul
# peak) ~20 s. torch.compile is left out: compiling SDPO's shapes took over 195 s.
QUICK="--repeats 2 --sample-calls 1"
# 1. The paper's precision and batches, every algorithm, against the per-member way.
perf fp16 200 --mixed-precision fp16 --algos sdpo,rebel,d3po,ddpo $QUICK
# 2. The memory target with gradient checkpointing (REBEL: K = 50 in chunks of 8 steps).
perf fp16-ckpt 100 --mixed-precision fp16 --gradient-checkpointing --algos sdpo,rebel --no-baseline $QUICK
# 3. MFU where launches no longer dominate: 8 pairs per training call (bf16).
perf bf16-tb8 90 --mixed-precision bf16 --algos sdpo --batch-size 16 --train-batch-size 8 --no-baseline $QUICK

cat "$OUT"/runs/*.md > "$OUT/tables.md"
python3 - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
records = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
(out / "records.json").write_text(json.dumps(records, indent=2) + "\n")
EOF
rm -r "$OUT/runs"
echo "done in ${SECONDS}s"
cat "$OUT/tables.md"
