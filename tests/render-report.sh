#!/usr/bin/env bash
# Opens a run's report.html in headless Chromium and takes a screenshot, to check that the page
# renders (inline SVG curves, tables) with no network and no files beside it.
#
#   bash tests/render-report.sh [RUN_DIR] [OUT.png]
#
# Without RUN_DIR it trains a 60-step shakespeare-char run into a temporary folder first.
# Skips (exit 0, with the reason) where no Chromium is installed: apt-get install chromium.
set -euo pipefail
cd "$(dirname "$0")/.."

browser=""
for b in chromium chromium-browser google-chrome; do
  if command -v "$b" >/dev/null; then browser="$b"; break; fi
done
if [ -z "$browser" ]; then
  echo "skipping: no Chromium on this machine (apt-get install chromium)"
  exit 0
fi

run="${1:-}"
out="${2:-report.png}"
if [ -z "$run" ]; then
  run="$(mktemp -d)/run"
  cargo run --release --quiet -- train recipes/shakespeare-char.toml --run-dir "$run" --quiet \
    --set trainer.max_steps=60 --set trainer.eval_every=20 --set trainer.eval_batches=4 >/dev/null
fi
report="$(realpath "$run")/report.html"
[ -f "$report" ] || { echo "error: $report does not exist; run \`kiln report $run\` first" >&2; exit 1; }

# A copy alone in an empty folder: the page must not need anything beside it.
alone="$(mktemp -d)"
cp "$report" "$alone/report.html"
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,2600 \
  --screenshot="$(realpath -m "$out")" "file://$alone/report.html" >/dev/null 2>&1

# A blank page would be a small, uniform PNG: demand real content.
size=$(stat -c %s "$out")
if [ "$size" -lt 20000 ]; then
  echo "error: $out is only $size bytes: the report rendered blank" >&2
  exit 1
fi
echo "rendered $report → $out ($size bytes)"
