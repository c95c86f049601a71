#!/usr/bin/env bash
# The work that needs a lent GPU (issues #6 and #8), packed into few device calls.
# docs/benchmarks.md ("On a lent GPU") has the whole recipe; in short:
#
#   here:    bash scripts/gpu_session.sh fetch
#            .whl/ <- hydra-core, omegaconf, antlr4 (the device image has torch, PyG, scipy,
#            matplotlib, tensorboard... but not hydra); .whl/ and .gpu_runs/ are git-ignored
#   device:  run(command="bash scripts/gpu_session.sh bench", carry=[".whl"])
#            #8's table: $OUT/benchmarks_h100{,_tf32,_amp}.json and the log $OUT/bench.log
#   device:  run(command="bash scripts/gpu_session.sh compare [HYDRA_OVERRIDE ...]",
#                carry=[".whl", ".gpu_runs"])
#            #6's table: scripts/compare.py experiment=agnews_quasi, stopped with SIGINT before
#            the call's 10-minute limit (the run in progress writes its checkpoint and resumes on
#            the next call while the machine is warm). Finished runs (their metrics.json) come
#            back in $OUT/compare_runs.tar.gz: unpack it here into .gpu_runs/ and carry that
#            folder next time, so a later session goes on where this one stopped.
#
# Environment: BUDGET_S (seconds of the compare call, default 540), OUT (the device tool's).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(hydra-core==1.3.8 omegaconf==2.3.1)
PURE_SDIST=(antlr4-python3-runtime==4.9.3)   # no wheel on PyPI: built here (pure Python)
COMPARE_DIR=outputs/compare/agnews_gpu
OUT=${OUT:-outputs/gpu_session}

setup_device() {
    # Only on the device: the carried wheels, and the checkout on the path (no pip install).
    if [ -d .whl ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
    else
        export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    fi
    export PYTHONUNBUFFERED=1
    mkdir -p "$OUT"
    python3 -c "import torch, torch_geometric, hydra; print('torch', torch.__version__, \
'pyg', torch_geometric.__version__, 'hydra', hydra.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
    nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv || true
}

case "${1:-}" in
fetch)
    mkdir -p .whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_17_x86_64 -d .whl "${WHEELS[@]}"
    python3 -m pip wheel -q --no-deps -w .whl "${PURE_SDIST[@]}"
    ls -la .whl
    ;;
bench)
    setup_device
    set -o pipefail
    # float32 first (the reference for the targets), then TF32 (the trainer's default on
    # CUDA) and bfloat16 autocast; each writes its JSON after every section and is cut off
    # in time for the next one to run inside the call's 10 minutes
    timeout -s INT 300 python3 scripts/benchmark.py --sections training inference \
        --device cuda --json "$OUT/benchmarks_h100.json" 2>&1 | tee "$OUT/bench.log" || true
    timeout -s INT 120 python3 scripts/benchmark.py --sections training --device cuda --tf32 \
        --json "$OUT/benchmarks_h100_tf32.json" 2>&1 | tee -a "$OUT/bench.log" || true
    timeout -s INT 120 python3 scripts/benchmark.py --sections training --device cuda --amp \
        --json "$OUT/benchmarks_h100_amp.json" 2>&1 | tee -a "$OUT/bench.log" || true
    ;;
compare)
    shift
    setup_device
    mkdir -p "$COMPARE_DIR"
    if [ -f .gpu_runs/compare_runs.tar.gz ]; then   # finished runs of earlier sessions
        tar -xzf .gpu_runs/compare_runs.tar.gz -C "$COMPARE_DIR"
    fi
    # SIGINT: the trainer saves a checkpoint and exits; compare.py skips finished runs.
    status=0
    timeout -s INT -k 30 "${BUDGET_S:-540}" python3 scripts/compare.py experiment=agnews_quasi \
        output_dir="$COMPARE_DIR" "$@" 2>&1 | tee "$OUT/compare.log" || status=$?
    (cd "$COMPARE_DIR" && find . -maxdepth 4 \( -name metrics.json -o -name 'results.*' \) \
        | tar -czf "$OUT/compare_runs.tar.gz" -T -)
    [ -f "$COMPARE_DIR/results.md" ] && cp "$COMPARE_DIR/results.md" "$OUT/"
    echo "compare exit status: $status (124/130: stopped at the budget; run again to go on)"
    ;;
*)
    sed -n '2,18p' "$0"
    exit 2
    ;;
esac
