#!/usr/bin/env bash
# Issue 7's GPU figures in one call of about 5 minutes on one H100/H200: the sd-turbo
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
# carry=[".whl"], timeout_s=480). Everything lands in $OUT (tables.md, records.json,
# log.txt, env.txt); without $OUT (a plain shell) it goes to results/perf/gpu.
# A dry run of the same sequence on a CPU, reduced (about 5 minutes on 2 cores):
#   PATH=$PWD/.venv/bin:$PATH OUT=/tmp/gpu-check \
#   PERF_EXTRA="--reduced --resolution 64 --steps 2 --batch-size 4" bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-results/perf/gpu}
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

# 1. The paper's precision, every algorithm, against the per-member way.
perf fp16 170 --mixed-precision fp16 --algos sdpo,ddpo,d3po,rebel
# 2. The memory target: gradient checkpointing on.
perf fp16-ckpt 80 --mixed-precision fp16 --gradient-checkpointing --algos sdpo,ddpo,rebel --no-baseline
# 3. bf16 ratio drift and memory at the paper's batch.
perf bf16-ckpt 50 --mixed-precision bf16 --gradient-checkpointing --algos sdpo --no-baseline
# 4. MFU at a larger minibatch (4 pairs = 8 UNet samples per training call).
perf bf16-tb4 50 --mixed-precision bf16 --algos sdpo --train-batch-size 4 --no-baseline
# 5. torch.compile, if time is left (compilation takes a minute or two).
if [ "$SECONDS" -lt 250 ]; then
  perf bf16-compile 130 --mixed-precision bf16 --algos sdpo --compile-unet --no-baseline --repeats 2
fi

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
