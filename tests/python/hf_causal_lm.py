"""Loads a kiln-exported Hugging Face folder with transformers and reports what kiln's tests
compare: the tokenizer's ids for a prompt, the logits for given ids, and greedy generation.

usage: hf_causal_lm.py FOLDER REQUEST.json  → prints one JSON object
REQUEST: {"prompt": str, "ids": [int], "max_new_tokens": int}
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

folder, request = sys.argv[1], json.load(open(sys.argv[2]))
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
model.eval()
ids = torch.tensor([request["ids"]])
with torch.no_grad():
    logits = model(ids).logits[0]
    prompt_ids = tok(request["prompt"], add_special_tokens=False)["input_ids"]
    out = model.generate(
        torch.tensor([prompt_ids]),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        max_new_tokens=request["max_new_tokens"],
        do_sample=False,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
    )[0].tolist()
print(json.dumps({
    "architecture": type(model).__name__,
    "prompt_ids": prompt_ids,
    "logits": logits.tolist(),
    "generated": out[len(prompt_ids):],
    "decoded": tok.decode(out, skip_special_tokens=False),
}))
