#!/usr/bin/env bash
# The GPU figures in the README, in one go, from the repository root on a machine with an NVIDIA GPU and torch:
#   bash scripts/gpu-speed.sh [OUT]
# Random bf16 weights of Mistral-7B's shape (they time like trained ones). Where the machine's image lacks the
# pinned transformers or plotly, put their wheels in .whl/ first; they are installed to /tmp/site, not over it.
set -uo pipefail
out=${1:-${OUT:-bench-out/gpu}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# The device tool brings back at most 8 files: each run's HTML report goes as soon as it is written, so that a lease
# that ends mid-script still brings back env, log and each finished run's csv and json.
tidy() { rm -f "$out"/*/speed.html; }
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  # Every decode path gives the dynamic path's tokens on this GPU (tiny Mistral, Llama and Qwen2), the patch's too.
  python3 -m pytest -q -p no:cacheprovider tests/test_decode.py tests/test_compiled_prefill.py tests/test_patch_static.py -k on_a_gpu 2>&1 | tail -4
} 2>&1 | tee "$out/env.txt"
# Time to first token and decode, base against the presets (turbo: groups, 2x fewer FLOPs) and the article-style
# cutoff 16, dynamic against the static decode recorded as a CUDA graph (the app's default on a GPU).
python3 -m slerpviz.bench speed --shape mistral-7b --device cuda --lengths 1024,4096,16384 \
  --preset recommended,fast,turbo --cutoffs 16 --modes cached --decode dynamic,graph --repeats 5 --new-tokens 16 \
  --out "$out/speed" 2>&1 | tee "$out/speed.log"; tidy
# The prompt's layers and merges through torch.compile beside the eager ones, base and `recommended` alike, with
# the compile's time (a graph for the layers, two for each of its two merges; one preset keeps it inside the lease).
timeout "${PREFILL_TIMEOUT:-260}" python3 -m slerpviz.bench speed --shape mistral-7b --device cuda \
  --lengths 1024,4096,16384 --preset recommended --modes cached --decode dynamic --prefill eager,compiled \
  --repeats 5 --new-tokens 2 --out "$out/prefill" 2>&1 | tee -a "$out/speed.log"; tidy
# The torch.compile'd decode beside it, with its compile time (it may not finish in a short lease).
timeout "${COMPILED_TIMEOUT:-180}" python3 -m slerpviz.bench speed --shape mistral-7b --device cuda --lengths 4096 \
  --preset recommended --modes cached --decode graph,compiled --repeats 3 --new-tokens 16 \
  --out "$out/compiled" 2>&1 | tee -a "$out/speed.log"; tidy
# The patch as users run it: generate under slerpviz.merging with a static cache (the static decoder recorded as a
# CUDA graph) against its dynamic cache and the plain model's dynamic generate (a plain static cache would compile).
timeout "${PATCH_TIMEOUT:-120}" python3 -m slerpviz.bench patch --shape mistral-7b --device cuda --lengths 4096 \
  --preset recommended --caches dynamic,static --plain-caches dynamic --repeats 2 --new-tokens 16 \
  --out "$out/patch" 2>&1 | tee -a "$out/speed.log"
# At the end, one archive of the finished runs' folders (csv and json), which `tar -xzf results.tar.gz` unpacks.
tar -czf "$out/results.tar.gz" -C "$out" $(cd "$out" && ls -d speed prefill compiled patch 2>/dev/null) \
  && rm -rf "$out"/speed "$out"/prefill "$out"/compiled "$out"/patch
