"""Reads a run's TensorBoard event files with TensorBoard's own EventAccumulator.

usage: tb_scalars.py RUN/tb ; prints one JSON object: "scalars", {tag: [[step, value], ...]} in
the order TensorBoard holds them (a value that is not finite as null, as in metrics.jsonl), and
"texts", {tag: [[step, text], ...]} for the text plugin's summaries.
"""

import json
import math
import sys

from tensorboard.backend.event_processing.event_accumulator import (
    SCALARS,
    TENSORS,
    EventAccumulator,
)

# 0: keep every event (the default samples scalars down to 10,000 per tag).
acc = EventAccumulator(sys.argv[1], size_guidance={SCALARS: 0, TENSORS: 0})
acc.Reload()
tags = acc.Tags()
scalars = {
    tag: [[e.step, e.value if math.isfinite(e.value) else None] for e in acc.Scalars(tag)]
    for tag in tags["scalars"]
}
texts = {}
for tag in tags["tensors"]:
    metadata = acc.SummaryMetadata(tag)
    if metadata.plugin_data.plugin_name != "text":
        continue
    texts[tag] = [
        [e.step, b"".join(e.tensor_proto.string_val).decode()] for e in acc.Tensors(tag)
    ]
print(json.dumps({"scalars": scalars, "texts": texts}))
