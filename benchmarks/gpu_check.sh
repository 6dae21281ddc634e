#!/usr/bin/env bash
# One GPU check of everything the GPU path promises, in one command that fits a short rental of one H200:
# at most ~9 minutes of wall time, at most 8 files under OUT_DIR.
#
#     bash benchmarks/gpu_check.sh OUT_DIR            # on the GPU machine
#     bash benchmarks/gpu_check.sh --smoke OUT_DIR    # anywhere, on the CPU: tiny sizes, seconds per section
#
# Sections, in priority order, each under its own time limit (never past the overall budget), each writing its
# results the moment it finishes (OUT_DIR/results.tgz is re-packed after every section, so a run cut short still
# returns everything before the cut):
#   a  env       environment, the project importable from the working tree (no registry), one-time
#                kernel compile                                                                       (45 s)
#   b  tests     the CUDA tests: kernels, data ops, loop                                             (120 s)
#   c  loss      benchmarks/bench_loss.py --gpu-check: the fused loss's targets                      (60 s)
#   d  data      benchmarks/bench_data.py --device cuda on synthetic 224-px JPEG shards written here
#                by smi-make-shards: decode + augmentation targets                                   (60 s)
#   e  r50       accelerate launch recipes/pretrain_r50.py, 150 steps at batch 256, bf16, SMI then
#                Barlow Twins: images/s, data-wait share, peak memory, finite loss                    (120 s)
#   f  vit       recipes/pretrain_vit_s16.py, 80 steps                                                (45 s)
#   g  cifar     whatever time is left: ResNet-18 (CIFAR stem) on CIFAR-10, SMI and Barlow Twins side
#                by side at the comparison harness's gpu preset, then kNN, the linear probe, the flowers12
#                transfer and the spatial concentration of both backbones
# then OUT_DIR/summary.md: one table with every section, its time, its numbers and its targets (pass / fail).
#
# Inputs that travel with the working tree (benchmarks/gpu_check_prepare.sh puts them in .gpu/, which git ignores):
# .gpu/wheels/*.whl (packages the GPU image lacks, e.g. webdataset, braceexpand), .gpu/data/cifar10 and
# .gpu/data/flowers12 (section g: CIFAR-10 shards, the transfer set). Overrides: GPU_CHECK_BUDGET (seconds, default 530), WORK_DIR (scratch, default a temporary
# folder), SECTIONS (default "env tests loss data r50 vit cifar"), G_STEPS (section g's steps, default: from the
# time left).
set -u
SMOKE=0
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; shift; fi
OUT=${1:?usage: gpu_check.sh [--smoke] OUT_DIR}
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 2
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-530}
WORK=${WORK_DIR:-$(mktemp -d)}
RES=$WORK/results
SECTIONS=" ${SECTIONS:-env tests loss data r50 vit cifar} "
mkdir -p "$OUT" "$RES"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$WORK/triton-cache}
PY=${PYTHON:-python3}
SYNTH=$WORK/synth/shards/train-*.tar
CIFAR=${CIFAR_DIR:-$REPO/.gpu/data/cifar10}
FLOWERS=${FLOWERS_DIR:-$REPO/.gpu/data/flowers12}
[ -d "$FLOWERS" ] || [ -n "${FLOWERS_DIR:-}" ] || FLOWERS=$REPO/../shared/data/flowers12
if [ "$SMOKE" = 1 ]; then
    export TRITON_INTERPRET=1 ACCELERATE_USE_CPU=1
    BUDGET=${GPU_CHECK_BUDGET:-300}
fi
echo -e "section\tstatus\tseconds" > "$RES/sections.tsv"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
pack() {  # results so far -> OUT_DIR/results.tgz (atomically)
    tar czf "$OUT/.results.tgz.tmp" -C "$WORK" results && mv "$OUT/.results.tgz.tmp" "$OUT/results.tgz"
}
# section NAME LIMIT COMMAND...: run COMMAND under min(LIMIT, time left), log to results/NAME.log, record the status
section() {
    local name=$1 limit=$2 rest status t0
    shift 2
    if [[ "$SECTIONS" != *" $name "* ]]; then return 0; fi
    rest=$(left)
    [ "$rest" -lt "$limit" ] && limit=$rest
    if [ "$limit" -le 5 ]; then
        echo -e "$name\tskipped (no time left)\t0" >> "$RES/sections.tsv"
        return 0
    fi
    echo "== $(date -u +%FT%TZ) section $name (limit ${limit}s)"
    t0=$(date +%s)
    # a bash -c child so that shell functions (exported below) run under timeout; the whole process group is
    # signalled at the limit (SIGKILL 10 s later for anything that ignores SIGTERM)
    timeout --kill-after=10 "$limit" bash -c '"$@"' _ "$@" > "$RES/$name.log" 2>&1
    status=$?
    case $status in
        0) status=ok
           # a section that could run only in part says why in NAME.skipped (e.g. data a plain clone lacks)
           [ -s "$RES/$name.skipped" ] && status="ok (partly skipped: $(head -n 1 "$RES/$name.skipped"))" ;;
        124|137) status="timeout after ${limit}s" ;;
        *) status="failed (rc $status)"; tail -n 30 "$RES/$name.log" ;;
    esac
    echo -e "$name\t$status\t$(( $(date +%s) - t0 ))" >> "$RES/sections.tsv"
    echo "   $status in $(( $(date +%s) - t0 ))s"
    pack
}

# ---- a: environment, the project importable from the working tree, one-time compile --------------------------
# The GPU machine reaches no registry: the carried wheels go to a folder of their own (the image's packages stay
# untouched) and the project is imported from this tree (no pip: a build backend may be missing there), with
# smi_timm.kernels mapped to kernels/ by a symlink, as the installed package maps it (git ignores the link).
if [ "$SMOKE" = 0 ]; then
    if compgen -G ".gpu/wheels/*.whl" > /dev/null && ! $PY -c "import webdataset" 2>/dev/null; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
            .gpu/wheels/*.whl && export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    if ! $PY -c "import smi_timm.kernels" 2>/dev/null; then
        ln -sfn ../kernels smi_timm/kernels
        export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
    fi
fi
env_section() {
    if [ "$SMOKE" = 0 ]; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || return 1
    fi
    $PY benchmarks/gpu_check_env.py --precompile $([ "$SMOKE" = 1 ] && echo --smoke) --out "$RES/env.json"
}
export SMOKE PY RES WORK SYNTH CIFAR OUT START BUDGET
export -f left env_section
section env 45 env_section
# ---- b: the CUDA tests -----------------------------------------------------------------------------------------
if [ "$SMOKE" = 1 ]; then
    section tests 120 $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_train_cuda.py
else
    section tests 120 $PY -m pytest -q -p no:cacheprovider -rfE -m cuda tests/
fi

# ---- c: the loss benchmark -----------------------------------------------------------------------------------
if [ "$SMOKE" = 1 ]; then
    section loss 60 $PY benchmarks/bench_loss.py --smoke --out "$RES/bench_loss.json"
else
    section loss 60 $PY benchmarks/bench_loss.py --gpu-check --out "$RES/bench_loss.json"
fi

# ---- d: the data benchmark (writes the synthetic shards sections e and f train on) ---------------------------
if [ "$SMOKE" = 1 ]; then
    section data 60 $PY benchmarks/bench_data.py --smoke --make-shards "$WORK/synth" --count 64 \
        --out "$RES/bench_data.json"
else
    section data 60 $PY benchmarks/bench_data.py --device cuda --make-shards "$WORK/synth" --count 4096 \
        --out "$RES/bench_data.json"
fi

# ---- e, f: the main job and the ViT swap ---------------------------------------------------------------------
# recipe NAME SCRIPT STEPS LOG_EVERY [extra flags...]: one training run; its metrics and summary go to results/NAME
recipe() {
    local name=$1 script=$2 steps=$3 every=$4
    shift 4
    local launch=(accelerate launch --num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no)
    [ "$SMOKE" = 1 ] && launch=(accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no
                                --dynamo_backend no)
    "${launch[@]}" "$script" --data "$SYNTH" --max-steps "$steps" --warmup-steps 10 --log-every "$every" \
        --save-every 0 --no-progress --output-dir "$WORK/$name" "$@"
    local rc=$?
    mkdir -p "$RES/$name"
    cp "$WORK/$name"/{train_summary.json,metrics.jsonl,run_config.json} "$RES/$name/" 2>/dev/null
    return $rc
}
r50_section() {
    local steps=150 every=25 small=()
    [ "$SMOKE" = 1 ] && steps=2 every=1 small=(--model resnet10t --batch-size 4 --image-size 64 --projector 64-64
                                               --workers 0)
    recipe r50_smi recipes/pretrain_r50.py $steps $every --loss smi "${small[@]}" || return 1
    recipe r50_barlow recipes/pretrain_r50.py $steps $every --loss barlow "${small[@]}"
}
vit_section() {
    local steps=80 every=20 small=()
    [ "$SMOKE" = 1 ] && steps=2 every=1 small=(--model vit_tiny_patch16_224 --batch-size 4 --image-size 32
                                               --projector 64-64 --workers 0
                                               --model-kwargs img_size=32 patch_size=8 drop_path_rate=0.1)
    recipe vit_smi recipes/pretrain_vit_s16.py $steps $every "${small[@]}"
}
export -f recipe r50_section vit_section
section r50 120 r50_section
section vit 45 vit_section

# ---- g: CIFAR-10 at the harness's gpu preset with the time left ------------------------------------------------
# SMI and Barlow Twins side by side (two processes on the one GPU), seed 0, settings chosen by the CPU sweep's
# validation kNN (the linear-probe choice, neg_weight 1, collapses with longer training: docs/RESULTS.md); then the
# test-split kNN and linear probe, the flowers12 transfer and the spatial concentration of both exports, the report.
cifar_section() {
    local preset=gpu steps=${G_STEPS:-} data=$CIFAR sel=(--sweep-from results/cifar10-cpu --select knn)
    if [ "$SMOKE" = 1 ]; then
        preset=smoke steps=${G_STEPS:-3} data=$SMOKE_DATA sel=(--fixed-settings)
    fi
    # steps that fit: two runs share the GPU; keep 120 s for the evaluations, transfer, spatial maps and report
    [ -z "$steps" ] && steps=$(( ($(left) - 120) * ${G_STEPS_PER_S:-10} ))
    [ "$steps" -lt 100 ] && [ "$SMOKE" = 0 ] && { echo "not enough time left for section g"; return 1; }
    local common=(--preset "$preset" --data-dir "$data" --transfer-dir "$FLOWERS" --out "$WORK/cifar" --no-progress)
    local pids=() rc=0
    for method in smi barlow; do
        $PY benchmarks/compare_methods.py "${common[@]}" "${sel[@]}" --phase final --methods "$method" --seeds 0 \
            --final-steps "$steps" --eval-every 0 > "$RES/cifar_$method.log" 2>&1 &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
    if [ -d "$FLOWERS" ]; then
        $PY benchmarks/compare_methods.py "${common[@]}" --phase transfer spatial > "$RES/cifar_transfer.log" 2>&1 \
            || rc=1
    else  # a plain clone has no ../shared: the rest of the section still runs
        echo "transfer and spatial: no flowers12 data at $FLOWERS" | tee "$RES/cifar.skipped"
    fi
    $PY benchmarks/compare_methods.py "${common[@]}" --phase report > "$RES/cifar_report.log" 2>&1 || rc=1
    mkdir -p "$RES/cifar"
    cp -r "$WORK"/cifar/table.md "$WORK"/cifar/spatial "$WORK"/cifar/runs/*_test.json "$WORK"/cifar/runs/*_transfer.json \
        "$RES/cifar/" 2>/dev/null
    return $rc
}
SMOKE_DATA=${SMOKE_DATA:-}
if [ "$SMOKE" = 1 ] && [ -z "$SMOKE_DATA" ]; then
    SMOKE_DATA=$($PY -c "import os, smi_timm.data as d; print(os.path.dirname(d.sample_shards('train')[0]))")
fi
export SMOKE_DATA FLOWERS
export -f cifar_section
section cifar 600 cifar_section

# ---- summary ---------------------------------------------------------------------------------------------------
$PY benchmarks/gpu_check_summary.py "$RES" $([ "$SMOKE" = 1 ] && echo --smoke) > "$OUT/summary.md"
cp "$OUT/summary.md" "$RES/summary.md"
pack
cat "$OUT/summary.md"
echo "== done in $(( $(date +%s) - START ))s; results in $OUT (summary.md, results.tgz)"
