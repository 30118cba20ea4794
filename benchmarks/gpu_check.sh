#!/usr/bin/env bash
# The GPU checks of issue 18 in one go, on a CUDA machine, from the repository root (7-9 minutes on an H200):
#   1. the tests marked gpu (exact mode vs CPU codes, float16/bfloat16 agreement per level, the encode stage on CUDA,
#      and a whole run where Ray and the audio libraries are installed);
#   2. bench_encode.py, ours exact (float32, TF32 off) and fast (float16, TF32 on): 64 and 128 clips of 10 s and one
#      1-hour clip: x-realtime, peak memory, fast-vs-exact agreement per level; the 1-hour clip again in chunks of
#      1500 frames (2 min) instead of 150, the measure for device-aware chunk sizes (issue 18, item 3);
#   3. bench_pipeline.py --device cuda (20 minutes of FLAC, end to end), only where Ray and soundfile import;
# with the GPU's utilisation sampled every second throughout (nvidia-smi dmon), so the busy share of each step can
# be read off. Every step has its own time limit; a step that fails or runs out leaves its log and the rest go on.
#
#   benchmarks/gpu_check.sh OUT_DIR
#
# Python packages missing on the GPU image can travel as wheels in .whl/ (see the device README): they are installed
# into /tmp/site first. Ray's wheel (79 MB) is over the 64 MiB that travels, so on a bare image step 3 and the Ray
# test are skipped, and say so.
set -u -o pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
summary=$out/summary.txt
: >"$summary"
note() { echo "$*" | tee -a "$summary"; }

nvidia-smi >"$out/nvidia-smi.txt" 2>&1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" 2>&1 | tee -a "$summary"
nvidia-smi dmon -s u -d 1 -o T >"$out/dmon.txt" 2>&1 &
dmon=$!

# step NAME SECONDS COMMAND...: runs it with a time limit, its output in OUT/NAME.log; notes the start and end times
step() {
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    note "== $name from $(date +%H:%M:%S): $*"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    note "== $name: exit $rc after $(($(date +%s) - start)) s (limit $limit s) until $(date +%H:%M:%S)"
}

step tests 110 python3 -m pytest -q -p no:cacheprovider -m gpu -s tests/test_gpu.py
grep -E "^\[GPU|passed|failed|skipped|Error" "$out/tests.log" | tee -a "$summary"

step encode 270 python3 benchmarks/bench_encode.py --device cuda --impls ours --fast --cases b64_10s,b128_10s,1x1h \
    --repeats 3 --markdown --json "$out/encode.json" --weights-dir /tmp/mimi-bench-weights
sed -n '/^\*\*/,$p' "$out/encode.log" | tee -a "$summary"

step chunks 100 python3 benchmarks/bench_encode.py --device cuda --impls ours --fast --cases 1x1h --chunk-frames 1500 \
    --repeats 2 --markdown --weights-dir /tmp/mimi-bench-weights
sed -n '/^\*\*/,$p' "$out/chunks.log" | tee -a "$summary"

if python3 -c "import ray, soundfile, soxr, av" 2>/dev/null; then
    step pipeline 90 python3 benchmarks/bench_pipeline.py --device cuda --minutes 20 --files-per-shard 8 --markdown \
        --workdir /tmp/mimi-bench-pipeline
    tail -n 8 "$out/pipeline.log" | tee -a "$summary"
else
    note "== pipeline: skipped (ray, soundfile, soxr or av does not import here)"
fi

kill "$dmon" 2>/dev/null
# GPU busy share per step: the mean SM utilisation of the dmon samples between the step's start and end times
python3 - "$out" <<'EOF' | tee -a "$summary"
import re, sys
from pathlib import Path

out = Path(sys.argv[1])
samples = [(f[0], int(f[2])) for f in (line.split() for line in (out / "dmon.txt").read_text().splitlines())
           if len(f) > 2 and not f[0].startswith("#") and f[2].isdigit()]
spans = re.findall(r"== (\w+) from (\S+):.*\n(?:.*\n)*?== \1: exit .* until (\S+)", (out / "summary.txt").read_text())
for name, start, end in spans:
    busy = [sm for t, sm in samples if start <= t <= end]
    print(f"GPU busy (SM %, mean of {len(busy)} one-second samples) during {name}: "
          f"{sum(busy) / len(busy):.0f}" if busy else f"GPU busy during {name}: no samples")
EOF
