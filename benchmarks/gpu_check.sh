#!/usr/bin/env bash
# Issue 17's GPU figures in one call of about 8 minutes on one H100/H200 (9.5 at most: each
# part has its own time limit, so one slow part cannot eat the others'), at the SDPO
# paper's configuration: the sd-turbo architecture (random weights) at 512px, K = 50,
# fp16, 8 trajectories per sampling call, minibatches of 2 groups, 64 trajectories and
# 100 epochs (results/perf/README.md says what each column means):
#   1. paper: every algorithm that `benchmarks.perf` times (sdpo, ddpo, rebel, d3po, grpo,
#      nft; DRaFT back-propagates the reward, which JPEG has none of): sample traj/s, train
#      transitions/s, MFU, peak GB, seconds per epoch and hours for 100 epochs projected
#      from the measured calls (one UNet call per loss call), the epoch at the FLOP limit;
#      SDPO's epoch also measured through the trainer's own code on 16 trajectories (scaled
#      to 64) with its default micro-batch, which joins the loss calls of an update;
#   2. reference: the SDPO reference's own script (benchmarks/reference_sdpo.py) at the same
#      configuration, JPEG reward, 2 epochs of one sampling batch (scaled to its 4);
#   3. overlap: SDPO's sampling with rewards overlapped or not, with a model reward (the
#      aesthetic predictor on CLIP ViT-L/14, random weights) instead of JPEG.
# tables.md opens with the side-by-side of stepzoo's and the reference's SDPO epoch.
#
# The GPU machine has torch, transformers, peft and accelerate but neither diffusers nor
# tyro, and no package index or internet: carry three git-ignored folders (about 21 MB:
# .whl 7 MB, .refwhl 14 MB, .ref 0.1 MB).
# Once, on the CPU machine, in the repo root:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform any -d .whl \
#     diffusers==0.42.1 tyro==1.0.17 docstring-parser typeguard importlib_metadata
# and .ref/sdpo (the reference's files) and .refwhl (its packages) as the docstring of
# benchmarks/reference_sdpo.py says. Then through the device tool:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl", ".refwhl", ".ref"], timeout_s=600)
# PARTS picks the parts (default "paper reference overlap", issue 17's); issue 16's full-size
# flow-matching rows are two more, "sd3.5" and "flux" (benchmarks.perf --preset sd3.5-medium /
# flux-schnell at their presets' bf16, 512px and K; random weights, T5-XXL included), run as
#   run(command="PARTS='sd3.5 flux' bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
# Everything lands in $OUT (tables.md, records.json, log.txt, env.txt, reference-log.txt);
# without $OUT (a plain shell) it goes to results/perf/gpu/latest.
# A dry run of the same sequence on a CPU, reduced (75-113 s on 2 shared cores, 2026-11-30):
#   PATH=$PWD/.venv/bin:$PATH OUT=/tmp/gpu-check \
#   PERF_EXTRA="--reduced --resolution 64 --steps 4 --mixed-precision no" \
#   REF_EXTRA="--reduced --resolution 64 --steps 4 --mixed-precision no" bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-results/perf/gpu/latest}
mkdir -p "$OUT/runs"
LOG="$OUT/log.txt"

# stepzoo's packages (a dry run in a venv that holds them carries none).
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# part TAG SECONDS COMMAND...: one part, bounded so one slow part cannot eat the rest.
part() {
  local tag=$1 limit=$2
  shift 2
  [[ " ${PARTS:-paper reference overlap} " == *" $tag "* ]] || return 0
  echo "=== $tag (at ${SECONDS}s, limit ${limit}s)" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | grep -v "should be kept in float32" | tee -a "$LOG"
}

# Sized from the 2026-11-26 H100 run (results/perf/gpu/2026-11-26-h100): a sampling call
# of 8 trajectories at K = 50 ~3.3 s (D3PO's, with the base model's log-probs, twice that),
# an SDPO training call of 2 pairs 0.14 s, a setting's start (random 866M UNet, matmul
# peak) ~20 s. With --repeats 1 --sample-calls 1 an algorithm makes ~6 sampling calls
# (~20 s; D3PO ~40 s); SDPO's measured 16 trajectories add 2 calls and 200 training calls
# (~35 s): part 1 ~190 s. Part 2: the model folder (2.6 GB) and the reference's start
# ~60 s, then per epoch 2 pipeline calls of 8 and 200 training calls of 2 UNet calls each
# (~70 s). Part 3: ~70 s.
# shellcheck disable=SC2086
part paper 240 python3 -m benchmarks.perf --preset sd-turbo --tag paper --out "$OUT/runs" \
  --mixed-precision fp16 --algos sdpo,ddpo,rebel,d3po,grpo,nft --no-baseline --repeats 1 --sample-calls 1 \
  --measure-epoch sdpo --measured-trajectories 16 ${PERF_EXTRA:-}
# shellcheck disable=SC2086
part reference 240 python3 -m benchmarks.reference_sdpo --epochs 2 --batches-per-epoch 1 --out "$OUT/runs" \
  ${REF_EXTRA:-}
# shellcheck disable=SC2086
part overlap 90 python3 -m benchmarks.perf --preset sd-turbo --tag overlap-aesthetic --out "$OUT/runs" \
  --mixed-precision fp16 --algos sdpo --reward aesthetic --random-reward-weights --no-baseline --repeats 2 \
  --sample-calls 2 ${PERF_EXTRA:-}
# The flow presets' pipelines are built in full on the device (a 2.5B transformer and the
# 4.8B T5-XXL encoder for SD3.5-medium, 12B and T5-XXL for FLUX.1-schnell): each part's
# limit leaves the build a minute or two.
# shellcheck disable=SC2086
part sd3.5 240 python3 -m benchmarks.perf --preset sd3.5-medium --tag full --out "$OUT/runs" \
  --no-baseline --repeats 1 --sample-calls 1 ${PERF_EXTRA:-}
# shellcheck disable=SC2086
part flux 240 python3 -m benchmarks.perf --preset flux-schnell --tag full --out "$OUT/runs" \
  --no-baseline --repeats 1 --sample-calls 1 ${PERF_EXTRA:-}
# Issue 30's full fine-tuning row, "full-ft": GRPO training every weight of SD3.5-medium's
# 2.5B transformer (float32 master weights, gradients and AdamW moments: 16 bytes a weight,
# 40 GB), sharded over a group of one (--fsdp: the code path of N GPUs, none of its savings).
# FLUX.1-schnell's 12B would need 192 GB on one GPU: 24 GB a GPU over 8, beyond one call.
#   run(command="PARTS=full-ft bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=420)
# shellcheck disable=SC2086
part full-ft 300 python3 -m benchmarks.perf --preset sd3.5-medium --tag grpo-full-fsdp --out "$OUT/runs" \
  --algos grpo --finetune full --fsdp --no-baseline --repeats 1 --sample-calls 1 ${PERF_EXTRA:-}

cp /tmp/stepzoo-reference-sdpo/reference.log "$OUT/reference-log.txt" 2>/dev/null
python3 - "$OUT" <<'EOF'
import json, pathlib, sys
from benchmarks.reference_sdpo import side_by_side
out = pathlib.Path(sys.argv[1])
records = {p.stem: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))}
(out / "records.json").write_text(json.dumps(list(records.values()), indent=2) + "\n")
paper = next((r for name, r in records.items() if name.endswith("-paper")), None)
reference = next((r for name, r in records.items() if name.startswith("reference-sdpo")), None)
tables = [side_by_side(paper, reference)] if paper and reference and any(
    row["algo"] == "sdpo" and "epoch_s" in row for row in paper["rows"]) else []
# The paper table, the reference, then the overlap.
order = lambda p: (not p.stem.endswith("-paper"), not p.stem.startswith("reference"), p.stem)
tables += [p.read_text() for p in sorted((out / "runs").glob("*.md"), key=order)]
(out / "tables.md").write_text("\n".join(tables))
EOF
rm -r "$OUT/runs"
echo "done in ${SECONDS}s"
cat "$OUT/tables.md"
