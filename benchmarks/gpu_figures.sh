#!/usr/bin/env bash
# Every GPU figure the README still lacks, in parts that each fit one 10-minute device call.
# Run from the repository root on a CUDA machine with the package installed:
#   bash benchmarks/gpu_figures.sh kernels vit      # or: all
# Each part writes results/<name>.json (which records its own command) and a log beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p results
export HF_HUB_OFFLINE=1

part() {
  local name=$1; shift
  echo "== $name: $*"
  "$@" 2>&1 | tee "results/$name.log"
}

run_part() {
  case $1 in
    kernels)  # issue 6: reference vs Triton, whole selection path, ViT signals, end-to-end share
      part kernels_gpu python benchmarks/kernels.py --out results/kernels_gpu.json ;;
    vit)  # issue 10: images/s unpatched vs patched, timm ViT-B/16 and open_clip ViT-B-16
      part vit_gpu python benchmarks/vit.py --out results/vit_gpu.json ;;
    bench7b)  # issue 7: LLaVA-1.5-7B-sized, 64 of 576 tokens, batch 1 and 8, plain path
      part bench_llava15_7b vtprune bench --model llava-1.5-7b --random-weights \
        --methods divprune,hiprune,todre,fastv,random --keep 64 --batch 1,8 --new-tokens 32 \
        --out results/bench_llava15_7b.json ;;
    compiled7b)  # issue 7: the batch-1 compiled path (compile_llm) beside the plain one
      part bench_llava15_7b_compiled vtprune bench --model llava-1.5-7b --random-weights \
        --methods divprune,random --keep 64 --batch 1 --new-tokens 32 --compile \
        --out results/bench_llava15_7b_compiled.json ;;
    next7b)  # issue 7: LLaVA-NeXT-7B-sized, 2880 -> 320 tokens, batch 4
      part bench_llava_next_7b vtprune bench --model llava-next-7b --random-weights \
        --methods divprune,random --ratio 0.111 --batch 4 --new-tokens 32 \
        --out results/bench_llava_next_7b.json ;;
    *) echo "unknown part $1 (kernels vit bench7b compiled7b next7b all)" >&2; exit 2 ;;
  esac
}

[ $# -gt 0 ] || { echo "usage: $0 PART... (kernels vit bench7b compiled7b next7b all)" >&2; exit 2; }
for p in "$@"; do
  if [ "$p" = all ]; then
    for q in kernels vit bench7b compiled7b next7b; do run_part "$q"; done
  else
    run_part "$p"
  fi
done
