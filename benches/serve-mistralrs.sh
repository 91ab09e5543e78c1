#!/usr/bin/env bash
# A kiln Llama export served by a real server: mistral.rs (`mistralrs serve`, OpenAI-compatible,
# Rust), end to end. Trains shakespeare-llama for 600 steps (or takes RUN), exports it, starts
# the server on 127.0.0.1 only, asks /v1/completions for a greedy completion and checks that its
# tokens equal `kiln generate RUN --temperature 0` for the same prompt and length; then the same
# for a run fine-tuned from that export with `init_from`.
#
#   bash benches/serve-mistralrs.sh [RUN]
#
# Needs `mistralrs` (cargo install mistralrs-cli --locked: a CPU build, no features; far too
# slow to build in CI, so the script skips, saying why, when it is missing). The server is
# stopped on exit and everything is bounded in time.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mistralrs >/dev/null 2>&1; then
  echo "skipping: mistralrs is not installed (cargo install mistralrs-cli --locked)"
  exit 0
fi
kiln=$PWD/target/release/kiln
cargo build --release --quiet

work=$(mktemp -d)
server=""
cleanup() {
  [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

# Serves RUN's export and checks one greedy completion against kiln's (label: what RUN is).
check() { # RUN LABEL NAME
  local run=$1 label=$2 hf=$work/hf-$3 port answer want got body
  "$kiln" export "$run" --out "$hf" >/dev/null
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  # f32 as kiln (on the CPU, mistral.rs would pick bf16), no prefix cache, the model's context.
  timeout 900 mistralrs serve -m "$hf" --cpu --dtype f32 --paged-attn off --prefix-cache-n 0 \
    --max-seq-len 64 --token-source none --host 127.0.0.1 --port "$port" \
    >"$work/server-$3.log" 2>&1 &
  server=$!
  echo "$label: mistralrs serve (pid $server) on 127.0.0.1:$port"
  local t0=$SECONDS
  until curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null 2>&1; do
    if ! kill -0 "$server" 2>/dev/null || [ $((SECONDS - t0)) -gt 300 ]; then
      echo "mistralrs did not serve within 300 s or exited:" >&2
      tail -30 "$work/server-$3.log" >&2
      exit 1
    fi
    sleep 0.5
  done

  # kiln prints the prompt and its continuation.
  want=$("$kiln" generate "$run" --prompt "$prompt" --max-new-tokens "$n" --temperature 0)
  want=${want#"$prompt"}
  # The completion's tokens, from logprobs: `text` has its leading whitespace trimmed.
  body=$(python3 -c 'import json, sys; print(json.dumps({"model": "default", "prompt": sys.argv[1], "max_tokens": int(sys.argv[2]), "temperature": 0, "logprobs": 1}))' "$prompt" "$n")
  answer=$(curl -sf --max-time 300 "http://127.0.0.1:$port/v1/completions" \
    -H 'Content-Type: application/json' -d "$body")
  echo "$answer" > "$work/answer-$3.json"
  got=$(python3 -c 'import json, sys
c = json.loads(sys.argv[1])["choices"][0]
lp = c.get("logprobs") or {}
print("".join(t["token"] for t in lp["content"]) if lp.get("content") else c["text"], end="")' "$answer")
  kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true; server=""

  printf '%s\n  prompt     %q\n  kiln       %q\n  mistral.rs %q\n' "$label" "$prompt" "$want" "$got"
  if [ "$want" = "$got" ]; then
    echo "  PASS: mistral.rs continues the prompt as kiln generate does"
  else
    echo "  FAIL: the texts differ" >&2
    failed=1
  fi
}

prompt="ROMEO:"
n=40
failed=0
run=${1:-}
if [ -z "$run" ]; then
  run=$work/run
  echo "training shakespeare-llama for 600 steps…"
  "$kiln" train recipes/shakespeare-llama.toml --set trainer.max_steps=600 \
    --set trainer.eval_every=0 --quiet --run-dir "$run" >/dev/null
fi
check "$run" "shakespeare-llama ($run)" trained

# A run that starts from an exported folder (init_from) and fine-tunes it.
"$kiln" export "$run" --out "$work/base" >/dev/null
echo "fine-tuning it for 200 steps from its export (init_from)…"
"$kiln" train recipes/shakespeare-llama.toml --set init_from="$work/base" \
  --set trainer.max_steps=200 --set schedule.warmup_steps=20 --set trainer.eval_every=0 --quiet \
  --run-dir "$work/tuned" >/dev/null
check "$work/tuned" "shakespeare-llama fine-tuned from init_from" tuned
exit $failed
