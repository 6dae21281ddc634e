#!/usr/bin/env bash
# GPU checks and measurements, each section under its own time limit. Sections (PARTS, default
# "tests bench efficiency throughput"):
#   tests       the CUDA kernel tests (Triton kernels against float64 references, compile, opcheck) + the loss tests
#   bench       the loss benchmark (fused Triton kernels vs torch eager vs Barlow Twins, forward + backward)
#   efficiency  loss-only and full training step, SMI vs Barlow Twins vs VICReg, 2048 and 8192 wide, batch 256
#   throughput  recipes/pretrain_cifar10.py (ResNet-18 CIFAR stem, batch 256, bf16), 300 steps, SMI and Barlow
#   probe       8 concurrent 200-step runs of the comparison harness's cpu configuration, with 1 and then 2
#               loader workers each: how long the harness's final phase takes on this machine
#   final       the harness's final phase (cpu preset: 4 methods x 2 seeds as 8 concurrent processes, settings
#               chosen by the sweep records in SWEEPS/runs; FINAL_WORKERS overrides the loader workers); runs
#               alongside the tests when both are asked for (timed sections come after)
#
#     bash benchmarks/gpu_check.sh CIFAR10_DIR OUT_DIR
#     PARTS=final SWEEPS=results/cifar10-cpu bash benchmarks/gpu_check.sh CIFAR10_DIR OUT_DIR
#
# Time limits (seconds; each section is stopped at its limit and the script goes on): TESTS_LIMIT (900),
# BENCH_LIMIT (600), EFFICIENCY_LIMIT (300), THROUGHPUT_LIMIT (300 per run), FINAL_LIMIT (3600 per run).
#
# CIFAR10_DIR holds train-{000000..000004}.tar.gz and test-000000.tar.gz (docs/data.md). Results land in OUT_DIR:
# bench_loss_cuda.json, efficiency_cuda.json, throughput.txt, and final.tgz (the harness's runs/*_test.json,
# table.md, knn_curves.png and the logs of the 8 runs). Training runs and logs go to WORK_DIR (default: a temporary folder); the tail of any
# failing log is printed.
set -u
DATA=${1:?usage: gpu_check.sh CIFAR10_DIR OUT_DIR}
OUT=${2:?usage: gpu_check.sh CIFAR10_DIR OUT_DIR}
WORK=${WORK_DIR:-$(mktemp -d)}
SWEEPS=${SWEEPS:-}
PARTS=" ${PARTS:-tests bench efficiency throughput} "
want() { [[ "$PARTS" == *" $1 "* ]]; }
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1
SHARDS="$DATA/train-{000000..000004}.tar.gz"
step() { echo; echo "== $(date -u +%FT%TZ) $*"; }
show_failure() { echo "-- $1 failed (rc $2); last lines of its log:"; tail -n 25 "$3"; }

step environment
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
nproc
python - <<'EOF'
import platform, torch, triton, timm
print(f"python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}, "
      f"timm {timm.__version__}, device {torch.cuda.get_device_name()}, "
      f"{torch.cuda.get_device_properties(0).multi_processor_count} SMs")
EOF

final_one() {  # method seed
    local log="$WORK/final_$1_$2.log" args=(--preset "${PRESET:-cpu}" --phase final --methods "$1" --seeds "$2"
        --data-dir "$DATA" --sweep-from "$SWEEPS" --out "$WORK/final" --no-progress
        ${FINAL_WORKERS:+--workers "$FINAL_WORKERS"})
    OMP_NUM_THREADS=1 timeout "${FINAL_LIMIT:-3600}" python benchmarks/compare_methods.py "${args[@]}" > "$log" 2>&1
    local rc=$?
    if [ $rc -ne 0 ] && [ "$1" != barlow ] && [ "$1" != vicreg ] && [ $rc -ne 124 ]; then
        show_failure "final $1 seed $2 (Triton loss)" $rc "$log"
        echo "-- retrying final $1 seed $2 with --loss-backend torch"
        OMP_NUM_THREADS=1 timeout "${FINAL_LIMIT:-3600}" python benchmarks/compare_methods.py "${args[@]}" \
            --loss-backend torch >> "$log" 2>&1
        rc=$?
    fi
    [ $rc -ne 0 ] && show_failure "final $1 seed $2" $rc "$log"
    grep "^\[" "$log"
    return 0
}

pids=()
if want final; then
    [ -n "$SWEEPS" ] || { echo "PARTS=final needs SWEEPS=<folder with the sweep records>"; exit 2; }
    step "final phase of the harness (cpu preset, 4 methods x 2 seeds, 8 processes)"
    for method in smi smi-square barlow vicreg; do
        for seed in 0 1; do final_one "$method" "$seed" > "$WORK/final_summary_${method}_$seed.txt" & pids+=($!); done
    done
fi
if want tests; then
    step "1. CUDA kernel tests + loss tests"
    timeout "${TESTS_LIMIT:-900}" python -m pytest -q -p no:cacheprovider -rfE tests/test_kernels_cuda.py tests/test_losses.py \
        > "$WORK/tests.log" 2>&1
    echo "pytest rc=$?"; tail -n 30 "$WORK/tests.log"
fi
if want final; then
    wait "${pids[@]}"
    step "final phase done"
    cat "$WORK"/final_summary_*.txt
    python benchmarks/compare_methods.py --preset "${PRESET:-cpu}" --phase report --sweep-from "$SWEEPS" \
        --data-dir "$DATA" --out "$WORK/final" --no-progress > "$WORK/report.log" 2>&1 || show_failure report $? "$WORK/report.log"
    mkdir -p "$WORK/final/logs" && cp "$WORK"/final_*.log "$WORK/final/logs/"
    (cd "$WORK/final" && tar czf "$OUT/final.tgz" $(ls -d table.md knn_curves.png runs/*_test.json logs 2>/dev/null))
fi

if want bench; then
    step "2. loss benchmark"
    timeout "${BENCH_LIMIT:-600}" python benchmarks/bench_loss.py --no-compile --out "$OUT/bench_loss_cuda.json" \
        > "$WORK/bench_loss.log" 2>&1 || show_failure bench_loss $? "$WORK/bench_loss.log"
    grep -v "^\s*$" "$WORK/bench_loss.log" | tail -n 45
fi

if want efficiency; then
    step "3. efficiency: SMI vs Barlow Twins vs VICReg (batch 256, bf16 autocast for the model)"
    timeout "${EFFICIENCY_LIMIT:-300}" python benchmarks/bench_efficiency.py --device cuda --repeats 20 --amp bf16 \
        --out "$OUT/efficiency_cuda.json" > "$WORK/efficiency.log" 2>&1 \
        || show_failure efficiency $? "$WORK/efficiency.log"
    tail -n 12 "$WORK/efficiency.log"
fi

if want throughput; then
    step "4. training throughput: recipes/pretrain_cifar10.py (ResNet-18 CIFAR stem, batch 256, bf16), 300 steps"
    for loss in smi barlow; do
        timeout "${THROUGHPUT_LIMIT:-300}" python -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision bf16 \
            --dynamo_backend no recipes/pretrain_cifar10.py --data "$SHARDS" --epoch-samples 50000 --loss "$loss" \
            --max-steps 300 --warmup-steps 50 --workers 12 --log-every 100 --mixed-precision bf16 --no-progress \
            --no-export --output-dir "$WORK/tp_$loss" > "$WORK/tp_$loss.log" 2>&1
        rc=$?
        [ $rc -ne 0 ] && show_failure "throughput $loss" $rc "$WORK/tp_$loss.log"
        echo "$loss: $(grep images_per_s "$WORK/tp_$loss/metrics.jsonl" 2>/dev/null | tail -n 1)" \
            | tee -a "$OUT/throughput.txt"
    done
fi

if want probe; then
    for workers in 1 2; do
        step "probe: 8 concurrent runs of the harness cpu configuration, $workers loader worker(s) each, 200 steps"
        for i in 0 1 2 3 4 5 6 7; do
            OMP_NUM_THREADS=1 timeout 45 python -m smi_timm.train.cli --model resnet18 --no-cifar-stem \
                --image-size 32 --projector 1024-1024 --augment cifar --batch-size 128 --workers "$workers" \
                --optimizer lars --lr 1.0 --warmup-steps 100 --max-steps 200 --log-every 100 --seed "$i" \
                --no-progress --no-export --data "$SHARDS" --epoch-samples 50000 \
                --output-dir "$WORK/probe_${workers}_$i" > "$WORK/probe_${workers}_$i.log" 2>&1 &
        done
        wait
        for i in 0 1 2 3 4 5 6 7; do
            echo "workers $workers run $i: $(grep images_per_s "$WORK/probe_${workers}_$i/metrics.jsonl" 2>/dev/null \
                | tail -n 1)" | tee -a "$OUT/throughput.txt"
        done
    done
fi
step done
