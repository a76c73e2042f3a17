#!/usr/bin/env bash
# The GPU rows of docs/benchmarks.md in one run, for a lent GPU whose time is short (~9 minutes on an H200; the tests took ~150 s there):
#   1. the kernel ablation, SD 1.5 at 512² fp16, without the diffusers + torch.compile row (fast);
#   2. whole pipelines: fastldm eager, fastldm + CUDA graphs, diffusers (benchmarks/gpu_pipeline.py);
#   3. the kernel and CUDA-graph tests with the Triton kernels compiled for the GPU (TRITON_INTERPRET=0);
#   4. the ablation again with the torch.compile row, if the time left allows.
# Each part gets what is left of BUDGET seconds (default 450), so one slow part cannot cost the others. The
# tables' markdown: fastldm.bench.ablation.markdown(json.load(open(path))).
#     OUT=results_dir [BUDGET=450] bash benchmarks/gpu_rows.sh
set -u
OUT=${OUT:-gpu_rows}
BUDGET=${BUDGET:-450}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
start=$SECONDS
left() { echo $(( BUDGET - (SECONDS - start) )); }
part() {  # part NAME MAX_SECONDS COMMAND...: run with a timeout of min(MAX, time left), log to $OUT/NAME.log
    local name=$1 max=$2; shift 2
    local t; t=$(left); (( t > max )) && t=$max
    if (( t < 20 )); then echo "== $name: skipped, ${t}s left" | tee -a "$OUT/machine.txt"; return; fi
    echo "== $name (timeout ${t}s, $(left)s left)"
    local t0=$SECONDS
    timeout "$t" "$@" > "$OUT/$name.log" 2>&1
    echo "== $name: rc $? in $(( SECONDS - t0 ))s" | tee -a "$OUT/machine.txt"
    tail -n 25 "$OUT/$name.log"
}
FASTLDM=(python3 -c 'import sys; from fastldm.cli import main; sys.argv[0] = "fastldm"; main()')  # the CLI, not installed

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton",
triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())'
  nproc; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

part ablation 150 "${FASTLDM[@]}" bench ablation --device cuda --model sd15 --size 512 --dtype fp16 --no-compile \
    --json "$OUT/ablation_cuda_sd15_512.json"
test -n "${SKIP_PIPELINE:-}" || part pipeline 130 python3 benchmarks/gpu_pipeline.py --family sd1 --size 512 --json "$OUT/gpu_pipeline_sd15_512.json"
part tests 180 python3 -m pytest -q -p no:cacheprovider --timeout 60 tests/ops tests/runtime/test_cuda_graph.py \
    tests/bench/test_ablation.py --ignore=tests/ops/test_flash_attention_cpu.py \
    --ignore=tests/ops/test_blocked_attention.py --ignore=tests/ops/test_compile_for_gpu.py -rfEs
part ablation_compile 400 "${FASTLDM[@]}" bench ablation --device cuda --model sd15 --size 512 --dtype fp16 \
    --json "$OUT/ablation_cuda_sd15_512_compile.json"
echo "total $(( SECONDS - start ))s" | tee -a "$OUT/machine.txt"
