#!/usr/bin/env bash
# The GPU machine's check for kiln, run there in one call (issue: GPU correctness and speed).
#
# Prepare here (no GPU needed), from the repository root:
#   source /opt/cuda-13.0-pip/env.sh
#   ../shared/cuda/pack.sh build --release --features cuda --bin kiln
#   ../shared/cuda/pack.sh test --release --features cuda --no-run -p kiln-kernels --test cuda_parity
#   mkdir -p .gpu/bench && cp ../shared/bench/torch_gpu_bench.py .gpu/bench/
# Then, on the GPU machine (carry .gpu):
#   bash benches/gpu-check.sh
# It runs the CUDA parity tests, a short bf16 training run whose loss must fall, `kiln bench`
# of both GPU recipes, and PyTorch's reference on the same card, then prints one table.
# Details land in $OUT (or ./gpu-out).
set -uo pipefail
out=${OUT:-gpu-out}; mkdir -p "$out"
run() { bash .gpu/run.sh "$@"; }

echo "== CUDA parity tests"
run --all-tests 2>&1 | tee "$out/tests.txt" | grep -E "^test result|FAILED|panicked" || true

echo "== short bf16 training run (loss must fall)"
run kiln train recipes/shakespeare-char-gpu.toml --device cuda --quiet --run-dir "$out/char-gpu" \
  --set trainer.max_steps=200 --set trainer.eval_every=100 --set trainer.eval_batches=20 \
  > "$out/train.txt" 2>&1; echo "exit $?" >> "$out/train.txt"; tail -4 "$out/train.txt"

# The PyTorch reference trains without dropout: so does the benchmark.
for r in shakespeare-char-gpu gpt2-124m-bench; do
  echo "== kiln bench $r"
  run kiln bench "recipes/$r.toml" --device cuda --steps 20 --warmup 5 --json --set model.dropout=0 \
    > "$out/kiln-$r.json" 2> "$out/kiln-$r.err"; cat "$out/kiln-$r.json" "$out/kiln-$r.err" | tail -3
done

echo "== PyTorch reference, same card"
OUT="$out" python3 .gpu/bench/torch_gpu_bench.py > "$out/torch.txt" 2>&1; tail -5 "$out/torch.txt"

python3 - "$out" <<'PY'
import json, sys, os
out = sys.argv[1]
print(f"{'workload':44} {'ms/step':>9} {'tok/s':>10} {'MFU':>6} {'peak MiB':>9}")
for r in ("shakespeare-char-gpu", "gpt2-124m-bench"):
    try:
        k = json.load(open(f"{out}/kiln-{r}.json"))
        mem = (k["peak_memory_bytes"] or 0) / 2**20
        print(f"{'kiln ' + r:44} {k['ms_per_step_median']:9.1f} {k['items_per_second']:10.0f} {100*(k['mfu'] or 0):5.1f}% {mem:9.0f}")
    except Exception as e:
        print(f"kiln {r}: no result ({e})")
try:
    for t in json.load(open(f"{out}/torch_bench.json")):
        name = ("torch.compile " if t["compile"] else "torch eager ") + t["name"]
        print(f"{name[:44]:44} {t['ms_per_step']:9.1f} {t['tokens_per_s']:10.0f} {100*t['mfu_vs_989']:5.1f}%")
except Exception as e:
    print(f"torch: no result ({e})")
PY
