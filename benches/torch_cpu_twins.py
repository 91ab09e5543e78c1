# PyTorch twins of kiln's CPU workloads: the same model, batch and optimizer as the recipe, one
# full training step (forward, loss, backward, clipping where the recipe clips, the update)
# timed like `kiln bench` (warm-up steps, then the median of the timed ones).
#   usage: python benches/torch_cpu_twins.py WORKLOAD [--steps N] [--warmup N]
#   WORKLOAD: char | mlp | minilm | resnet
# Prints one JSON object: workload, torch version, threads, ms_per_step_median, and the
# process's peak resident memory. benches/compare-torch.sh runs each next to `kiln bench`.
import argparse, json, math, os, random, resource, sys, time
import torch, torch.nn as nn, torch.nn.functional as F

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared")


class Block(nn.Module):
    """nanoGPT's block (pre-LayerNorm, causal attention, 4x GELU MLP)."""

    def __init__(s, d, h, bias):
        super().__init__()
        s.h = h
        s.ln_1, s.ln_2 = nn.LayerNorm(d, bias=bias), nn.LayerNorm(d, bias=bias)
        s.c_attn, s.c_proj = nn.Linear(d, 3 * d, bias=bias), nn.Linear(d, d, bias=bias)
        s.c_fc, s.mlp_proj = nn.Linear(d, 4 * d, bias=bias), nn.Linear(4 * d, d, bias=bias)

    def forward(s, x):
        b, t, c = x.shape
        q, k, v = s.c_attn(s.ln_1(x)).split(c, 2)
        q, k, v = [z.view(b, t, s.h, c // s.h).transpose(1, 2) for z in (q, k, v)]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + s.c_proj(y.transpose(1, 2).reshape(b, t, c))
        return x + s.mlp_proj(F.gelu(s.c_fc(s.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(s, vocab, ctx, layers, d, heads, bias):
        super().__init__()
        s.wte, s.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        s.h = nn.ModuleList([Block(d, heads, bias) for _ in range(layers)])
        s.ln_f = nn.LayerNorm(d, bias=bias)

    def forward(s, idx):
        x = s.wte(idx) + s.wpe(torch.arange(idx.shape[1]))
        for b in s.h:
            x = b(x)
        return s.ln_f(x) @ s.wte.weight.t()  # tied head


class Bert(nn.Module):
    """BERT's encoder (post-LayerNorm layers, GELU) with a classification head: MiniLM's sizes."""

    def __init__(s, vocab=30522, d=384, layers=6, heads=12, ff=1536, labels=77, p=0.1):
        super().__init__()
        s.word, s.pos, s.token_type = nn.Embedding(vocab, d), nn.Embedding(512, d), nn.Embedding(2, d)
        s.ln = nn.LayerNorm(d, eps=1e-12)
        s.drop = nn.Dropout(p)
        layer = lambda: nn.TransformerEncoderLayer(
            d, heads, ff, p, activation="gelu", batch_first=True, norm_first=False,
            layer_norm_eps=1e-12)
        s.layers = nn.ModuleList([layer() for _ in range(layers)])
        s.pooler, s.classifier = nn.Linear(d, d), nn.Linear(d, labels)

    def forward(s, ids, mask):
        t = ids.shape[1]
        x = s.word(ids) + s.pos(torch.arange(t)) + s.token_type(torch.zeros_like(ids))
        x = s.drop(s.ln(x))
        for l in s.layers:
            x = l(x, src_key_padding_mask=mask == 0)
        return s.classifier(s.drop(torch.tanh(s.pooler(x[:, 0]))))


class BasicBlock(nn.Module):
    def __init__(s, cin, cout, stride):
        super().__init__()
        s.c1, s.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        s.c2, s.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        s.short = None
        if stride != 1 or cin != cout:
            s.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(s, x):
        y = s.b2(s.c2(F.relu(s.b1(s.c1(x)))))
        return F.relu(y + (x if s.short is None else s.short(x)))


class ResNet(nn.Module):
    """kiln's fashion-mnist-resnet: a 3x3 stride-1 stem of 32, basic blocks 32-64-128 x2."""

    def __init__(s, stem=32, sizes=(32, 64, 128), depths=(2, 2, 2), classes=10):
        super().__init__()
        s.stem = nn.Sequential(nn.Conv2d(1, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU())
        blocks, cin = [], stem
        for i, (c, n) in enumerate(zip(sizes, depths)):
            for j in range(n):
                blocks.append(BasicBlock(cin, c, 2 if i > 0 and j == 0 else 1))
                cin = c
        s.blocks = nn.Sequential(*blocks)
        s.fc = nn.Linear(cin, classes)

    def forward(s, x):
        return s.fc(s.blocks(s.stem(x)).mean((2, 3)))


def minilm_batches(n, batch=32, max_length=64):
    """Random BANKING77 batches tokenized with MiniLM's tokenizer, padded to their longest."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(SHARED, "data/all-MiniLM-L6-v2/tokenizer.json"))
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=0)
    import csv
    with open(os.path.join(SHARED, "data/banking77/train.csv")) as f:
        texts = [row["text"] for row in csv.DictReader(f)]
    rng = random.Random(0)
    out = []
    for _ in range(n):
        enc = tok.encode_batch([rng.choice(texts) for _ in range(batch)])
        ids = torch.tensor([e.ids for e in enc])
        mask = torch.tensor([e.attention_mask for e in enc])
        out.append((ids, mask, torch.randint(0, 77, (batch,))))
    return out


def workload(name, n):
    """The model, its optimizer, a list of `n` batches and the loss of one."""
    torch.manual_seed(0)
    clip = None
    if name == "char":
        m = GPT(65, 64, 4, 128, 4, bias=False)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
        batches = [(torch.randint(0, 65, (12, 64)), torch.randint(0, 65, (12, 64))) for _ in range(n)]
        loss = lambda b: F.cross_entropy(m(b[0]).view(-1, 65), b[1].view(-1))
        clip = 1.0
    elif name == "mlp":
        m = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Dropout(0.2),
                          nn.Linear(512, 256), nn.ReLU(), nn.Dropout(0.2), nn.Linear(256, 10))
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.05)
        batches = [(torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))) for _ in range(n)]
        loss = lambda b: F.cross_entropy(m(b[0]), b[1])
    elif name == "minilm":
        m = Bert()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.01)
        batches = minilm_batches(n)
        loss = lambda b: F.cross_entropy(m(b[0], b[1]), b[2])
        clip = 1.0
    elif name == "resnet":
        m = ResNet()
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
        batches = [(torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))) for _ in range(n)]
        loss = lambda b: F.cross_entropy(m(b[0]), b[1])
    else:
        sys.exit(f"unknown workload {name!r}: char, mlp, minilm or resnet")
    m.train()
    return m, opt, batches, loss, clip


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("workload")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args()
    m, opt, batches, loss, clip = workload(a.workload, a.warmup + a.steps)
    times = []
    for i, b in enumerate(batches):
        t = time.perf_counter()
        l = loss(b)
        l.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
    times.sort()
    print(json.dumps({
        "workload": a.workload,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "steps": a.steps,
        "ms_per_step_median": 1e3 * times[len(times) // 2],
        "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))


if __name__ == "__main__":
    main()
