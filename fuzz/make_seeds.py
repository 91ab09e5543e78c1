"""Writes the seed corpora of the hf_folder and text_classification fuzz targets.

hf_folder inputs are a config.json, a NUL byte, then a model.safetensors holding every tensor
the config's model has (f16 zeros, to stay small). text_classification inputs are an options
byte (bit 0: TSV, bit 1: `sentence` column) and the file.
Run from fuzz/: python3 make_seeds.py
"""
import json
import struct
from pathlib import Path


def safetensors(tensors):
    header, offset = {}, 0
    for name, shape in tensors:
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + bytes(offset)


def gpt2(c=4, layers=1, vocab=8, positions=4):
    cfg = {"model_type": "gpt2", "n_embd": c, "n_layer": layers, "n_head": 2,
           "n_positions": positions, "vocab_size": vocab}
    t = [("wte.weight", [vocab, c]), ("wpe.weight", [positions, c]),
         ("ln_f.weight", [c]), ("ln_f.bias", [c])]
    for i in range(layers):
        p = f"h.{i}."
        t += [(p + "ln_1.weight", [c]), (p + "ln_1.bias", [c]),
              (p + "attn.c_attn.weight", [c, 3 * c]), (p + "attn.c_attn.bias", [3 * c]),
              (p + "attn.c_proj.weight", [c, c]), (p + "attn.c_proj.bias", [c]),
              (p + "ln_2.weight", [c]), (p + "ln_2.bias", [c]),
              (p + "mlp.c_fc.weight", [c, 4 * c]), (p + "mlp.c_fc.bias", [4 * c]),
              (p + "mlp.c_proj.weight", [4 * c, c]), (p + "mlp.c_proj.bias", [c])]
    return cfg, t


def llama(c=4, ff=6, layers=1, vocab=8, positions=4):
    cfg = {"model_type": "llama", "hidden_size": c, "intermediate_size": ff,
           "num_hidden_layers": layers, "num_attention_heads": 2, "num_key_value_heads": 1,
           "vocab_size": vocab, "max_position_embeddings": positions, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": True}
    kv = c // 2
    t = [("model.embed_tokens.weight", [vocab, c]), ("model.norm.weight", [c])]
    for i in range(layers):
        p = f"model.layers.{i}."
        t += [(p + "input_layernorm.weight", [c]), (p + "post_attention_layernorm.weight", [c]),
              (p + "self_attn.q_proj.weight", [c, c]), (p + "self_attn.k_proj.weight", [kv, c]),
              (p + "self_attn.v_proj.weight", [kv, c]), (p + "self_attn.o_proj.weight", [c, c]),
              (p + "mlp.gate_proj.weight", [ff, c]), (p + "mlp.up_proj.weight", [ff, c]),
              (p + "mlp.down_proj.weight", [c, ff])]
    return cfg, t


def bert(c=4, ff=6, layers=1, vocab=8, positions=4, labels=2):
    cfg = {"model_type": "bert", "hidden_size": c, "intermediate_size": ff,
           "num_hidden_layers": layers, "num_attention_heads": 2, "vocab_size": vocab,
           "max_position_embeddings": positions, "type_vocab_size": 2, "hidden_act": "gelu",
           "layer_norm_eps": 1e-12, "id2label": {str(i): f"L{i}" for i in range(labels)}}
    e = "bert." if labels else ""
    t = [(e + "embeddings.word_embeddings.weight", [vocab, c]),
         (e + "embeddings.position_embeddings.weight", [positions, c]),
         (e + "embeddings.token_type_embeddings.weight", [2, c]),
         (e + "embeddings.LayerNorm.weight", [c]), (e + "embeddings.LayerNorm.bias", [c]),
         (e + "pooler.dense.weight", [c, c]), (e + "pooler.dense.bias", [c])]
    for i in range(layers):
        p = f"{e}encoder.layer.{i}."
        for m in ["attention.self.query", "attention.self.key", "attention.self.value",
                  "attention.output.dense"]:
            t += [(p + m + ".weight", [c, c]), (p + m + ".bias", [c])]
        t += [(p + "attention.output.LayerNorm.weight", [c]),
              (p + "attention.output.LayerNorm.bias", [c]),
              (p + "intermediate.dense.weight", [ff, c]), (p + "intermediate.dense.bias", [ff]),
              (p + "output.dense.weight", [c, ff]), (p + "output.dense.bias", [c]),
              (p + "output.LayerNorm.weight", [c]), (p + "output.LayerNorm.bias", [c])]
    if labels:
        t += [("classifier.weight", [labels, c]), ("classifier.bias", [labels])]
    return cfg, t


out = Path("corpus/hf_folder")
for name, (cfg, tensors) in {"gpt2": gpt2(), "llama": llama(), "bert": bert(),
                             "bert-encoder": bert(labels=0)}.items():
    (out / name).write_bytes(json.dumps(cfg).encode() + b"\0" + safetensors(tensors))
# A config far larger than its weights: refused before anything is allocated.
cfg, tensors = gpt2()
cfg["n_embd"] = 1_000_000_000
(out / "gpt2-huge").write_bytes(json.dumps(cfg).encode() + b"\0" + safetensors(tensors))

out = Path("corpus/text_classification")
seeds = {
    "tsv": b"\x03sentence\tlabel\nit 's \"good\tpos\nbad\tneg\n\t\n",
    "csv": b"\x00text,label\n\"good, really\",pos\n\"say \"\"hi\"\"\",neg\n,\nx,unknown\n",
    "short-row": b"\x00text,label\nonly-one-field\n",
    "non-utf8": b"\x01text\tlabel\ncaf\xe9\tpos\n\xff\xfe\tneg\n",
    "crlf": b"\x02sentence,label\r\n\"a\r\nb\",pos\r\n",
}
for name, data in seeds.items():
    (out / name).write_bytes(data)
