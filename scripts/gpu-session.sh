#!/usr/bin/env bash
# What to run when a CUDA machine is lent for a short time (the image's python3 has torch;
# nothing is installed). From the repository root:
#
#   scripts/gpu-session.sh check               # CUDA tests, then `benchmarks.run gpu samplers`
#   scripts/gpu-session.sh start RUN,RUN,... N # accuracy runs on the GPU, N at a time, in
#                                              # the background (setsid: they outlive the call)
#   scripts/gpu-session.sh progress            # rounds done and seconds per round, per run
#   scripts/gpu-session.sh collect SECONDS DIR # wait, stop the runs, pack them into DIR
#   scripts/gpu-session.sh visit SECONDS RUN,RUN,... N DIR
#                                              # all in one call: check the counter sampler
#                                              # on CUDA (then the runs use it), start the
#                                              # runs, run the CUDA tests beside them, pack
#                                              # the runs into DIR every 45 s, stop them
#                                              # SECONDS after the start (or sooner, when
#                                              # all have finished); VISIT_TESTS=0 skips
#                                              # the CUDA tests
#
# The accuracy runs live in runs/accuracy-gpu/ and resume from their last checkpoint if
# started again. `collect` packs them whole (checkpoints too, a few MB): unpack the tarball
# in the repository root here (`tar xzf .../accuracy-runs.tgz`), tabulate with
# `BAFFLE_ACC_DEVICE=cuda BAFFLE_ACC_REPORT_ONLY=1 python -m benchmarks.run accuracy` (it
# also writes what resumes each run to benchmarks/results/accuracy/gpu/carry/: commit it,
# and `start` on a later session's GPU restores the runs from there), and carry
# runs/accuracy-gpu to this session's next GPU to go on. MNIST is read from $BAFFLE_MNIST_DIR
# (default ../shared/data/mnist, which does not travel to a device machine): copy the four .gz
# files into an ignored folder of the checkout (`.mnist`, listed in .git/info/exclude), name it
# in the `carry` of EVERY call (an ignored path left out of a call's carry is gone there, and
# a run started without it fails at once) and export BAFFLE_MNIST_DIR=$PWD/.mnist.
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
visit)
    t0=$(date +%s)
    mkdir -p "$5"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    # the counter sampler's CUDA draws must equal its CPU draws (same integer hash; the float
    # log/cos/sqrt may differ in the last bits) before the runs rely on it
    if $PY - <<'EOF'
import torch
from baffle.directions import counter_normals
a = counter_normals(12345, range(64), 100_003, "cpu")
b = counter_normals(12345, range(64), 100_003, "cuda").cpu()
err = (a - b).abs().max().item()
print(f"torch {torch.__version__}: counter sampler on CUDA against the CPU, max |diff| "
      f"{err:.2e} over {a.numel():,} entries, mean {b.mean():+.4f}, std {b.std():.4f}")
raise SystemExit(0 if err < 1e-4 and abs(b.std() - 1) < 1e-2 else 1)
EOF
    then export BAFFLE_ACC_SAMPLER=counter; else export BAFFLE_ACC_SAMPLER=torch; fi
    echo "runs draw with the $BAFFLE_ACC_SAMPLER sampler"
    "$0" start "$3" "$4"
    if [ "${VISIT_TESTS:-1}" != 0 ]; then  # VISIT_TESTS=0: the GPU to the runs alone
        timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py \
            >"$5/cuda-tests.log" 2>&1 &
    fi
    while [ $(( $(date +%s) - t0 )) -lt "$2" ]; do
        sleep 15
        pgrep -f "benchmarks.accuracy" >/dev/null || break  # every run finished
        if [ $(( ($(date +%s) - t0) % 45 )) -lt 15 ]; then  # a snapshot, for a call cut short
            tar czf "$5/.runs.tgz" --exclude='.*' runs/accuracy-gpu 2>/dev/null
            mv "$5/.runs.tgz" "$5/accuracy-runs.tgz"
            "$0" progress >"$5/progress.txt" 2>&1
        fi
    done
    pkill -TERM -f "benchmarks.accuracy"
    sleep 5
    tar czf "$5/accuracy-runs.tgz" --exclude='.*' runs/accuracy-gpu
    "$0" progress | tee "$5/progress.txt"
    if [ -f "$5/cuda-tests.log" ]; then tail -n 3 "$5/cuda-tests.log"; fi
    ;;
*)
    sed -n 2,29p "$0"
    exit 2
    ;;
esac
