#!/usr/bin/env bash
# GPU readiness check: on a machine with a CUDA device, in under 10 minutes,
#   1. the test suite's device tests (the tests whose names say cuda or devices; they skip on CPU),
#   2. the oracle-floor benchmark on CUDA (step time against the derivative evaluations it makes),
#   3. the mixed-precision figures (float32 vs bfloat16 and float16 autocast with loss scaling: time, activation and peak memory),
#   4. ITD's memory with and without gradient checkpointing,
# each under its own timeout, all results in one folder:
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default gpu-check-<timestamp>)
#
# Exit status: 0 all steps passed, 1 a step failed or timed out (see OUT_DIR/status.txt), 2 no CUDA.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device visible to torch: nothing to check" | tee "$OUT/status.txt"
    exit 2
fi
{ nvidia-smi || true; python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"; } > "$OUT/environment.txt" 2>&1
: > "$OUT/status.txt"
failed=0
step() {  # step NAME SECONDS COMMAND...
    local name=$1 seconds=$2
    shift 2
    local start=$SECONDS
    timeout "$seconds" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - start)) s (limit $seconds s)" | tee -a "$OUT/status.txt"
    [ "$rc" -eq 0 ] || failed=1
}
step tests 150 python -m pytest -q -rs -k "cuda or devices" tests/
step oracle_floor 180 python benchmarks/oracle_floor.py --device cuda --models linear mlp --repeats 5 --json "$OUT/oracle_floor.json"
step precision 120 python benchmarks/precision.py --device cuda --model mlp --n-train 5000
step memory_itd 90 python benchmarks/memory.py --device cuda --methods ITD --unroll 10 50 200 1000 --checkpoint none sqrt
echo "results in $OUT" | tee -a "$OUT/status.txt"
exit $failed
