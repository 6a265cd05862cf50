#!/usr/bin/env bash
# The checks that need a CUDA device, in one go: the Triton launch sweep, an Nsight Compute
# profile of the forward, the CUDA tests, and the op and engine benchmarks on the GPU. Run from
# the repository root on a machine with a GPU and with torch, triton and the project's other
# dependencies installed (no network needed):
#
#     bash scripts/gpu_checks.sh [OUT_DIR]        # OUT_DIR defaults to $OUT, else gpu-checks/
#     OPIR_DATA=../shared/data bash scripts/gpu_checks.sh   # also the CUDA training test
#     STEPS="sweep tests" bash scripts/gpu_checks.sh   # some of: sweep profile tests op engine
#
# It installs the checkout without touching dependencies, runs each step under its own time
# limit (a step that fails or runs out of time does not stop the next), and leaves in OUT_DIR
# the log and a tarball of the result files (bench/results/*-<gpu>.*) with the test report.
set -uo pipefail
out="${1:-${OUT:-gpu-checks}}"
mkdir -p "$out"
log="$out/log.txt"
# OPIR_NATIVE=0: the CPU side of the CUDA comparisons runs the PyTorch reference, the oracle (the
# CPU suite tests the native kernels against it), and nothing is built with -march for that host.
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 OPIR_NATIVE=0
steps=" ${STEPS:-sweep profile tests op engine} "

step() {  # step SECONDS NAME COMMAND...: run with a limit, log its exit status
    local limit=$1 name=$2
    shift 2
    echo "=== $name ($(date +%T), limit ${limit}s)" | tee -a "$log"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
    echo "=== $name: exit ${PIPESTATUS[0]}" | tee -a "$log"
}

step 60 machine bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
    python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"'
if ! python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >>"$log" 2>&1; then
    # Without pip's build: the packages by their import names (the console script is not needed).
    mkdir -p /tmp/opir-site
    ln -sfn "$PWD/opir_engine" /tmp/opir-site/opir_engine
    ln -sfn "$PWD/kernels" /tmp/opir-site/opir_kernels
    ln -sfn "$PWD/weights" /tmp/opir-site/opir_weights
    export PYTHONPATH="/tmp/opir-site${PYTHONPATH:+:$PYTHONPATH}"
    echo "pip install failed: using PYTHONPATH=$PYTHONPATH" | tee -a "$log"
fi

[[ $steps == *" sweep "* ]] && step "${SWEEP_LIMIT:-90}" triton-configs \
    python3 bench/triton_configs.py --sizes 3840x2160
best=$(python3 - <<'EOF'
import glob, json, os
# the newest: this run's sweep, not a committed file from another GPU
files = glob.glob("bench/results/triton_configs-*.json")
best = json.load(open(max(files, key=os.path.getmtime)))["best_fp32"] if files else None
print(f"{best['BLOCK_H']},{best['BLOCK_W']},{best['num_warps']}" if best else "")
EOF
)
# Nsight Compute on one 4K forward of the current and the replaced kernel (where ncu runs).
[[ $steps == *" profile "* ]] && step "${PROFILE_LIMIT:-90}" profile ncu --clock-control none \
    -k regex:fwd_kernel --launch-skip 2 --launch-count 2 --section SpeedOfLight \
    --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
    --section WarpStateStats --section SchedulerStats python3 bench/profile_forward.py \
    ${best:+--config "$best"}
# The CUDA tests; with OPIR_DATA (a folder holding the few real photos tests/test_train.py
# crops), also training on CUDA and resuming on the CPU.
# TEST_K narrows the selection (a pytest -k expression).
tests=(tests/test_cuda.py)
[ -n "${OPIR_DATA:-}" ] && tests+=(tests/test_train.py)
[[ $steps == *" tests "* ]] && step "${TEST_LIMIT:-200}" cuda-tests python3 -m pytest -q -rs \
    --durations=15 --junitxml="$out/cuda-tests.xml" "${tests[@]}" \
    -k "(cuda or test_cuda) and (${TEST_K:-test})"
[[ $steps == *" op "* ]] && step "${OP_LIMIT:-150}" op-bench python3 bench/op.py --reps 10 \
    --budget 2 --sizes ${OP_SIZES:-256x256 512x512 1920x1080 3840x2160} \
    ${best:+--triton-config "$best"}
[[ $steps == *" engine "* ]] && step "${ENGINE_LIMIT:-150}" engine-bench python3 bench/engine.py \
    --sizes ${ENGINE_SIZES:-512x512 1920x1080 4000x3000} --runs 3 --runs-large 3 \
    --note "CUDA run by scripts/gpu_checks.sh"

tar czf "$out/results.tgz" bench/results/*nvidia* "$out"/cuda-tests.xml 2>>"$log"
echo "=== done ($(date +%T))" | tee -a "$log"
