#!/usr/bin/env bash
# The GPU figures in the README, in one go, from the repository root on a machine with an NVIDIA GPU and torch:
#   bash scripts/gpu-speed.sh [OUT]
# Random bf16 weights of Mistral-7B's shape (they time like trained ones). Where the machine's image lacks the
# pinned transformers or plotly, put their wheels in .whl/ first; they are installed to /tmp/site, not over it.
#
# The steps run in the order they matter, each for at most its own cap and never past BUDGET seconds in all (540:
# a device command runs 600 s at most, and the archive at the end must be made before that), so a short lease still
# brings back the first steps whole. What comes back: env.txt, speed.log (every step's table) and results.tar.gz
# (every finished step's csv and json: `tar -xzf results.tar.gz`), three files where the device tool brings back 8.
# DRY=1 runs the same steps on a CPU, on the tiny shape and shorter prompts, to check the script itself.
set -uo pipefail
out=${1:-${OUT:-bench-out/gpu}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
budget=${BUDGET:-540}
began=$(date +%s)
if [[ ${DRY:-0} == 1 ]]; then
  shape=(--shape tiny --device cpu); cutoff=2; short=128,512; long=2048; mid=512
else
  shape=(--shape mistral-7b --device cuda); cutoff=16; short=1024,4096; long=16384; mid=4096
fi
folders=()

# step CAP FOLDER COMMAND...: COMMAND (a benchmark writing to $out/FOLDER) for at most CAP seconds, cut to what the
# budget has left; skipped when too little is left to start it.
step() {
  local cap=$1 folder=$2
  shift 2
  local left=$(( budget - ($(date +%s) - began) - 20 ))
  if (( left < 30 )); then
    echo "skipped, the budget is spent: $*" | tee -a "$out/speed.log"
    return
  fi
  echo "== $folder: at most $(( cap < left ? cap : left )) s: $*" | tee -a "$out/speed.log"
  timeout "$(( cap < left ? cap : left ))" "$@" --out "$out/$folder" 2>&1 | tee -a "$out/speed.log"
  rm -f "$out/$folder"/*.html  # the tables and JSON say it all
  if [[ -d "$out/$folder" ]]; then folders+=("$folder"); fi
}

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  # Every decode path gives the dynamic path's tokens on this GPU (tiny Mistral, Llama and Qwen2), the patch's too,
  # a batch's among them.
  timeout "${TESTS_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider tests/test_decode.py \
    tests/test_compiled_prefill.py tests/test_patch_static.py tests/test_patch_batch.py -k on_a_gpu 2>&1 | tail -4
} 2>&1 | tee "$out/env.txt"
# Time to first token and decode, base against the presets (turbo: groups, 2x fewer FLOPs) and the article-style
# cutoff 16, dynamic against the static decode recorded as a CUDA graph (the app's default on a GPU); 16k apart, so
# that the shorter prompts come back even if it does not finish.
step 200 speed python3 -m slerpviz.bench speed "${shape[@]}" --lengths "$short" \
  --preset recommended,fast,turbo --cutoffs "$cutoff" --modes cached --decode dynamic,graph --repeats 5 --new-tokens 16
step 120 speed-long python3 -m slerpviz.bench speed "${shape[@]}" --lengths "$long" \
  --preset recommended,fast,turbo --cutoffs "$cutoff" --modes cached --decode dynamic,graph --repeats 3 --new-tokens 16
# The prompt's layers and merges through torch.compile beside the eager ones, base and `recommended` alike, with
# the compile's time (a graph for the layers, two for each of its two merges).
step 150 prefill python3 -m slerpviz.bench speed "${shape[@]}" --lengths "$short,$long" --preset recommended \
  --modes cached --decode dynamic --prefill eager,compiled --repeats 5 --new-tokens 2
# The patch as users run it: generate under slerpviz.merging with a static cache (the static decoder recorded as a
# CUDA graph) against its dynamic cache and the plain model's dynamic generate (a plain static cache would compile).
step 90 patch python3 -m slerpviz.bench patch "${shape[@]}" --lengths "$mid" --preset recommended \
  --caches dynamic,static --plain-caches dynamic --repeats 2 --new-tokens 16
# The torch.compile'd decode beside the graph, with its compile time (a minute or more: near the end).
step 150 compiled python3 -m slerpviz.bench speed "${shape[@]}" --lengths "$mid" --preset recommended \
  --modes cached --decode graph,compiled --repeats 3 --new-tokens 16
# A batch of four prompts, padded on the left, through generate under the patch (each merged on its own, decoded
# together: a CUDA graph of the batch's step with a static cache) beside the plain model's batch: the tokens a second.
step 60 patch-batch python3 -m slerpviz.bench patch "${shape[@]}" --lengths "$mid" --preset recommended \
  --caches dynamic,static --plain-caches dynamic --batches 4 --repeats 2 --new-tokens 16
if (( ${#folders[@]} )); then
  tar -czf "$out/results.tar.gz" -C "$out" "${folders[@]}" && (cd "$out" && rm -rf "${folders[@]}")
fi
echo "done in $(( $(date +%s) - began )) s" | tee -a "$out/speed.log"
