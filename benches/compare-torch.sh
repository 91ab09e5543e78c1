#!/usr/bin/env bash
# kiln against PyTorch on the CPU, side by side: each workload's training step in kiln
# (`kiln bench`), then its PyTorch twin (benches/torch_cpu_twins.py, the same model, batch and
# optimizer), one right after the other, and the ratio kiln / PyTorch (< 1: kiln is faster).
# The machine is shared and noisy: only ratios from one sitting compare, so the README cites
# this script's table with the date.
#
#   bash benches/compare-torch.sh [--steps N] [--gpt2] [--run] [WORKLOAD ...]
#
# WORKLOAD: char (shakespeare-char, B12 T64, dropout 0), mlp (Fashion-MNIST MLP, B128),
# minilm (MiniLM-L6 on BANKING77, B32, batches padded to their longest), resnet (the
# fashion-mnist-resnet recipe, B128); all four by default.
#   --gpt2  adds GPT-2 124M (B2 T1024, f32) with peak resident memory (about 1 min a step in
#           each framework on 2 cores; 3 timed steps each).
#   --run   adds the whole shakespeare-char run (2,000 steps and evaluations) against
#           benches/torch_shakespeare_char.py.
#   --minilm-run  adds one epoch of the minilm-banking77 recipe, evaluations, checkpoint and
#           test split included (about 2 min each), against the transformers Trainer
#           (benches/torch_minilm_trainer.py; needs transformers beside torch).
#   --kiln BIN  times this kiln binary (e.g. a copy built from an older commit, for a before /
#           after pair in one sitting) instead of building target/release/kiln.
# PyTorch: $KILN_PYTHON, else /opt/torchref/bin/python, else python3, whichever imports torch
# (set up: python3 -m venv /opt/torchref && /opt/torchref/bin/pip install torch tokenizers, plus
# transformers accelerate for --minilm-run).
# Without one, kiln's figures are printed alone.
set -euo pipefail
cd "$(dirname "$0")/.."

steps=20
kiln=""
gpt2=0
run=0
minilm_run=0
workloads=()
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) steps="$2"; shift 2 ;;
    --gpt2) gpt2=1; shift ;;
    --run) run=1; shift ;;
    --minilm-run) minilm_run=1; shift ;;
    --kiln) kiln="$2"; shift 2 ;;
    char|mlp|minilm|resnet) workloads+=("$1"); shift ;;
    *) echo "unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
[ ${#workloads[@]} -gt 0 ] || workloads=(char mlp minilm resnet)

if [ -z "$kiln" ]; then
  kiln=target/release/kiln
  cargo build --release --quiet
fi
py=""
for p in "${KILN_PYTHON:-}" /opt/torchref/bin/python python3; do
  if [ -n "$p" ] && "$p" -c 'import torch' 2>/dev/null; then py="$p"; break; fi
done
if [ -z "$py" ]; then
  echo "no Python with torch found (set KILN_PYTHON): kiln's figures only" >&2
else
  echo "PyTorch: $("$py" -c 'import torch; print(torch.__version__, "threads", torch.get_num_threads())')"
fi
echo "kiln: $kiln, tree $(git rev-parse --short HEAD)$(git diff --quiet || echo '+changes'), $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores"

field() { python3 -c "import json,sys; v=json.loads(sys.argv[1]).get(sys.argv[2]); print('' if v is None else v)" "$1" "$2"; }
row() { # name kiln_ms torch_ms kiln_bytes torch_bytes
  python3 - "$@" <<'EOF'
import sys
name, k, t, kb, tb = sys.argv[1:6]
mib = lambda b: f"{int(b) / 2**20:.0f}" if b else "-"
ratio = f"{float(k) / float(t):.2f}x" if t else "-"
mem = f"{int(kb) / int(tb):.2f}x" if kb and tb else "-"
tms = f"{float(t):.1f}" if t else "-"
print(f"| {name} | {float(k):.1f} | {tms} | {ratio} | {mib(kb)} | {mib(tb)} | {mem} |")
EOF
}

declare -A recipe=(
  [char]="recipes/shakespeare-char.toml --set model.dropout=0.0"
  [mlp]="recipes/fashion-mnist-mlp.toml"
  [minilm]="recipes/minilm-banking77.toml --set data.bucket_by_length=false"
  [resnet]="recipes/fashion-mnist-resnet.toml"
)
rows=()
for w in "${workloads[@]}"; do
  # shellcheck disable=SC2086
  k=$($kiln bench ${recipe[$w]} --device cpu --steps "$steps" --warmup 3 --json)
  t=""
  [ -z "$py" ] || t=$("$py" benches/torch_cpu_twins.py "$w" --steps "$steps" --warmup 3)
  rows+=("$(row "$w step" "$(field "$k" ms_per_step_median)" \
    "$( [ -z "$t" ] || field "$t" ms_per_step_median)" "" "")")
done

if [ $gpt2 = 1 ]; then
  k=$($kiln bench recipes/gpt2-124m-bench.toml --device cpu --set precision=f32 \
    --set data.batch_size=2 --steps 3 --warmup 1 --json)
  t_ms="" t_bytes=""
  if [ -n "$py" ]; then
    log=$(mktemp)
    out=$( /usr/bin/time -v "$py" ../shared/bench/torch_gpt2_cpu_step.py 2 1024 4 2>"$log" | tail -1)
    t_ms=$(field "$out" ms_per_step_median)
    t_bytes=$(( $(awk -F': ' '/Maximum resident set size/ {print $2}' "$log") * 1024 ))
  fi
  rows+=("$(row "GPT-2 124M step" "$(field "$k" ms_per_step_median)" "$t_ms" \
    "$(field "$k" peak_memory_bytes)" "$t_bytes")")
fi

seconds() { # seconds a command takes, its output dropped
  local s
  s=$(date +%s.%N)
  "$@" >/dev/null
  python3 -c "import sys; print(float(sys.argv[2]) - float(sys.argv[1]))" "$s" "$(date +%s.%N)"
}

if [ $run = 1 ]; then
  dir=$(mktemp -d)
  k_s=$(seconds $kiln train recipes/shakespeare-char.toml --device cpu --quiet --run-dir "$dir/run")
  t_s=""
  [ -z "$py" ] || t_s=$(seconds "$py" benches/torch_shakespeare_char.py)
  rm -rf "$dir"
  rows+=("$(row "shakespeare-char run (s)" "$k_s" "$t_s" "" "")")
fi

if [ $minilm_run = 1 ]; then
  dir=$(mktemp -d)
  k_s=$(seconds $kiln train recipes/minilm-banking77.toml --device cpu --quiet \
    --set trainer.epochs=1 --run-dir "$dir/run")
  t_s=""
  if [ -n "$py" ] && "$py" -c 'import transformers' 2>/dev/null; then
    t_s=$(seconds "$py" benches/torch_minilm_trainer.py --shared ../shared 2>/dev/null)
  elif [ -n "$py" ]; then
    echo "no transformers beside torch ($py -m pip install transformers accelerate): kiln's MiniLM epoch alone" >&2
  fi
  rm -rf "$dir"
  rows+=("$(row "MiniLM BANKING77 epoch (s)" "$k_s" "$t_s" "" "")")
fi

echo
echo "| workload | kiln ms | PyTorch ms | kiln / PyTorch | kiln peak MiB | PyTorch peak MiB | memory ratio |"
echo "|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
