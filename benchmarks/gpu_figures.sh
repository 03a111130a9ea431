#!/usr/bin/env bash
# Every GPU figure the README still lacks, in one command. Run from a checkout on a CUDA machine with
# PyTorch (vtprune need not be installed: the checkout goes on PYTHONPATH):
#   bash benchmarks/gpu_figures.sh all
#   bash benchmarks/gpu_figures.sh --wheels .whl --archive /somewhere/figures.tgz --deadline 540 all
# --wheels DIR    install the wheels that DIR/requirements-X.Y.txt pins for this machine's Python X.Y
#                 (benchmarks/offline_wheels.py makes them) into a temporary folder placed first on
#                 PYTHONPATH: for an offline machine whose packages are missing or too old
# --archive FILE  after every part, pack results/ as far as it got into FILE (.tgz)
# --deadline S    stop within S seconds of the start: each part gets a time limit from what is left less
#                 40 s for each part after it, and at most its share of S (kernels 25 %, vit 10 %,
#                 compiled7b 45 %, bench7b 25 %, next7b 20 %; the last part run gets what is left), so that one that hangs
#                 does not starve the rest; a part cut short keeps what it measured (each writes its JSON row
#                 by row, the issues' target cases first)
# --cpu-ok        run the parts without a CUDA device (the tests); otherwise the script stops at once there
# Parts, in the order `all` runs them: kernels vit compiled7b bench7b next7b (the batch-1 compiled path, whose
# three cold torch.compile graphs of a 7B language model may take minutes, before the plain-path parts, which
# a short limit cuts after their first rows: batch 8 and 4, the issues' targets, come first);
# and video7b (a 32-frame clip on LLaVA-NeXT-Video-7B, per-frame vs per-clip budgets), run by name only.
# Medians of 10 runs for the kernel and ViT benchmarks (their default is 20), so that `all` fits ~9 minutes.
# Each writes results/<name>.json (which records its own command) and a log beside it; results/gpu_env.json
# records the machine and the versions used. A failed part does not stop the next; the exit status is 1
# if any failed.
set -uo pipefail
usage="usage: $0 [--wheels DIR] [--archive FILE] [--deadline SECONDS] [--cpu-ok] PART...
  parts: kernels vit bench7b next7b compiled7b video7b, or all (all but video7b)"
wheels="" archive="" deadline="" cpu_ok=""
while [ $# -gt 0 ]; do
  case $1 in
    --wheels) wheels=$(realpath -m "$2"); shift 2 ;;
    --archive) archive=$(realpath -m "$2"); mkdir -p "$(dirname "$archive")"; shift 2 ;;
    --deadline)  # whole seconds (9.5, 540s or an empty value broke the arithmetic, ran nothing and exited 0)
      [[ ${2-} =~ ^[0-9]+$ ]] || { echo "--deadline takes whole seconds, got '${2-}'" >&2; echo "$usage" >&2; exit 2; }
      deadline=$((10#$2)); shift 2 ;;
    --cpu-ok) cpu_ok=1; shift ;;
    -*) echo "$usage" >&2; exit 2 ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || { echo "$usage" >&2; exit 2; }
parts=()
for p in "$@"; do
  case $p in
    all) parts+=(kernels vit compiled7b bench7b next7b) ;;
    kernels|vit|bench7b|next7b|compiled7b|video7b) parts+=("$p") ;;
    *) echo "unknown part $p; $usage" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
mkdir -p results
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
written=(results/gpu_env.json)
install_failed=""
if [ -n "$wheels" ]; then
  site=$(mktemp -d)
  written+=(results/wheels.log)
  pyver=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  pins="$wheels/requirements-$pyver.txt"
  if [ -f "$pins" ]; then  # pip picks, of the wheels there, the ones built for this Python
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --find-links "$wheels" \
      --target "$site" -r "$pins" 2>&1 | tee results/wheels.log
    [ "${PIPESTATUS[0]}" -eq 0 ] || install_failed=1  # the machine record and the log are still packed
  else
    made=$(ls "$wheels" 2>/dev/null | sed -n 's/^requirements-\(.*\)\.txt$/\1/p' | xargs)
    if [ ! -d "$wheels" ]; then
      why="there is no folder $wheels"
    elif [ -n "$made" ]; then
      why="$wheels holds wheels for Python $made only"
    else
      why="$wheels holds no requirements-X.Y.txt (made by an older offline_wheels.py?)"
    fi
    echo "no $pins: $why; make them with benchmarks/offline_wheels.py --python-version $pyver" | tee results/wheels.log
    install_failed=1
  fi
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 - <<'EOF' | tee results/gpu_env.json
import importlib, json, platform, subprocess, torch
versions = {}
for name in ("torch", "triton", "transformers", "huggingface_hub", "timm", "open_clip", "vtprune"):
    try:
        versions[name] = getattr(importlib.import_module(name), "__version__", "?")
    except Exception as e:  # recorded, not fatal: the part that needs it says so
        versions[name] = f"missing ({type(e).__name__}: {e})"
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip() if gpu else None
print(json.dumps({"python": platform.python_version(), "gpu": gpu, "nvidia_smi": smi, "versions": versions}, indent=1))
EOF

pack() {
  [ -z "$archive" ] && return
  local have=()
  for f in "${written[@]}"; do [ -e "$f" ] && have+=("$f"); done
  tar czf "$archive.tmp" "${have[@]}" && mv "$archive.tmp" "$archive"
}

if [ -n "$install_failed" ]; then
  pack
  echo "failed: installing the wheels in $wheels (results/wheels.log)"; exit 1
fi
if [ -z "$cpu_ok" ] && ! python3 -c 'import json, sys; sys.exit(not json.load(open("results/gpu_env.json")).get("gpu"))'; then
  pack  # (every part would fail or, worse, run a GPU-sized benchmark on the CPU until its limit)
  echo "failed: no CUDA device (results/gpu_env.json); --cpu-ok runs the parts anyway"; exit 1
fi

failed=()
later=0  # parts still to run after this one
part() {  # part NAME SHARE COMMAND...: run it under the time left (at most SHARE % of the deadline), log beside its JSON
  local name=$1 share=$2; shift 2
  local limit=""
  rm -f "results/$name.json" "results/$name.md" "results/$name.log"  # never pack an earlier run's figures as this one's
  if [ -n "$deadline" ]; then
    local left=$((deadline - SECONDS - 15))  # 15 s kept for packing
    if [ "$left" -lt 30 ]; then
      echo "== $name: skipped, ${left}s left before the deadline"; failed+=("$name (no time)"); return
    fi
    limit=$((left - 40 * later))  # 40 s kept for each later part
    if [ "$later" -gt 0 ] && [ "$limit" -gt $((deadline * share / 100)) ]; then
      limit=$((deadline * share / 100))  # so that a hang here leaves the later parts their time
    fi
    [ "$limit" -ge 30 ] || limit=30  # as long as this one still gets 30 s
  fi
  echo "== $name: $* ${limit:+(limit ${limit}s)}"
  written+=("results/$name.json" "results/$name.md" "results/$name.log")
  local t0=$SECONDS
  if [ -n "$limit" ]; then
    timeout -k 10 "$limit" "$@" 2>&1 | tee "results/$name.log"
  else
    "$@" 2>&1 | tee "results/$name.log"
  fi
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "results/$name.log"
  [ "$rc" -eq 0 ] || failed+=("$name (exit $rc)")
  pack
}

for i in "${!parts[@]}"; do
  p=${parts[$i]}
  later=$((${#parts[@]} - i - 1))
  case $p in
    kernels)  # issue 6: reference vs Triton, whole selection path, ViT signals, end-to-end share
      part kernels_gpu 25 python3 benchmarks/kernels.py --reps 10 --out results/kernels_gpu.json ;;
    vit)  # issue 10: images/s unpatched vs patched, timm ViT-B/16 and open_clip ViT-B-16
      part vit_gpu 10 python3 benchmarks/vit.py --reps 10 --out results/vit_gpu.json ;;
    bench7b)  # issue 7: LLaVA-1.5-7B-sized, 64 of 576 tokens, batch 8 (every pre-LLM strategy) then 1, plain path
      part bench_llava15_7b 25 python3 -m vtprune bench --model llava-1.5-7b --random-weights \
        --methods divprune,hiprune,pool,token_shuffle,random,todre,fastv --keep 64 --batch 8,1 --new-tokens 8 \
        --out results/bench_llava15_7b.json ;;
    next7b)  # issue 7: LLaVA-NeXT-7B-sized, 2928 (2880 + newlines) -> 320 tokens, batch 4
      part bench_llava_next_7b 20 python3 -m vtprune bench --model llava-next-7b --random-weights \
        --methods divprune,random --keep 320 --batch 4 --new-tokens 4 \
        --out results/bench_llava_next_7b.json ;;
    compiled7b)  # issue 7: the batch-1 compiled path (compile_llm) beside the plain one
      part bench_llava15_7b_compiled 45 python3 -m vtprune bench --model llava-1.5-7b --random-weights \
        --methods divprune,random --keep 64 --batch 1 --new-tokens 32 --compile \
        --out results/bench_llava15_7b_compiled.json ;;
    video7b)  # a 32-frame clip (4608 visual tokens): divprune per frame and per clip (video_budget), random
      part bench_llava_next_video_7b 100 python3 -m vtprune bench --model llava-next-video-7b --random-weights \
        --task synthetic-video --methods divprune,random --ratio 0.25 \
        --config '{"method": "divprune", "options": {"video_budget": "clip"}}' --batch 1 --new-tokens 32 \
        --out results/bench_llava_next_video_7b.json ;;
  esac
done
pack
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}"; exit 1
fi
echo "all parts done"
