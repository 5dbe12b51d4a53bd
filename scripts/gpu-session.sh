#!/usr/bin/env bash
# What to run when a CUDA machine is lent for a short time (the image's python3 has torch;
# nothing is installed). From the repository root:
#
#   scripts/gpu-session.sh check               # CUDA tests, then `benchmarks.run gpu samplers`
#   scripts/gpu-session.sh start RUN,RUN,... N # accuracy runs on the GPU, N at a time, in
#                                              # the background (setsid: they outlive the call)
#   scripts/gpu-session.sh progress            # rounds done and seconds per round, per run
#   scripts/gpu-session.sh collect SECONDS DIR # wait, stop the runs, pack them into DIR
#
# The accuracy runs live in runs/accuracy-gpu/ and resume from their last checkpoint if
# started again. `collect` packs them whole (checkpoints too, a few MB): unpack the tarball
# in the repository root here (`tar xzf .../accuracy-runs.tgz`), tabulate with
# `BAFFLE_ACC_DEVICE=cuda BAFFLE_ACC_REPORT_ONLY=1 python -m benchmarks.run accuracy` (it
# also writes what resumes each run to benchmarks/results/accuracy/gpu/carry/: commit it,
# and `start` on a later session's GPU restores the runs from there), and carry
# runs/accuracy-gpu to this session's next GPU to go on. MNIST is read from $BAFFLE_MNIST_DIR
# (default ../shared/data/mnist).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=src:. PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
PY=${PYTHON:-python3}

case "${1:-}" in
check)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
    $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py
    $PY -m benchmarks.run gpu samplers 2>&1 | tail -n 80
    ;;
start)
    mkdir -p runs/accuracy-gpu
    BAFFLE_ACC_DEVICE=${BAFFLE_ACC_DEVICE:-cuda} BAFFLE_ACC_RUNS="$2" BAFFLE_ACC_JOBS="$3" \
        setsid nohup $PY -m benchmarks.accuracy >runs/accuracy-gpu/gpu-session.log 2>&1 \
        </dev/null &
    echo "started $2, $3 at a time"
    ;;
progress)
    for d in runs/accuracy-gpu/*/; do
        [ -f "$d/metrics.jsonl" ] || continue
        n=$(basename "$d")
        $PY - "$d" "$n" <<'EOF'
import json, sys
rows = [json.loads(x) for x in open(sys.argv[1] + "metrics.jsonl") if x.endswith("}\n")]
if rows:
    evals = [f"{r['test_top1']:.1f}" for r in rows if "test_top1" in r]
    wall = sum(r["wall_s"] for r in rows[-20:]) / len(rows[-20:])
    print(f"{sys.argv[2]}: {len(rows)} rounds, epoch {rows[-1]['epoch']:.2f}, "
          f"{wall:.3f} s/round lately, test top-1 {' '.join(evals)}")
EOF
    done
    grep -l -i "error\|traceback" runs/accuracy-gpu/*.log 2>/dev/null | while read -r f; do
        echo "== $f"; tail -n 5 "$f"; done
    ;;
collect)
    sleep "$2"
    pkill -TERM -f "benchmarks.accuracy"
    sleep 5
    mkdir -p "$3"
    tar czf "$3/accuracy-runs.tgz" runs/accuracy-gpu
    "$0" progress
    ;;
*)
    sed -n 2,17p "$0"
    exit 2
    ;;
esac
