# PyTorch reference for the shakespeare-char recipe: the same model and training setup as
# nanoGPT's CPU run (4 layers, 4 heads, 128 dims, context 64, batch 12, 2000 iterations,
# lr 1e-3 with 100 warmup steps and cosine decay to 1e-4, AdamW betas (0.9, 0.99), weight decay
# 0.1 on matrices, clip 1.0, no dropout, no biases, tied head, exact GELU), on kiln's schedule:
# 20 validation batches every 250 steps, a checkpoint (weights and optimizer state) every 1,000,
# and at the end the mean loss over every non-overlapping window of the validation split (plus
# nanoGPT's estimate from 20 random validation batches).
#   usage: python benches/torch_shakespeare_char.py [SEED ...]
import math, os, shutil, sys, json, tempfile, time, torch, torch.nn as nn, torch.nn.functional as F

text = open("data/tinyshakespeare/input.txt").read()
chars = sorted(set(text)); stoi = {c: i for i, c in enumerate(chars)}
data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
n = int(len(data) * 0.9); train, val = data[:n], data[n:]
V, T, B, L, H, C, STEPS = len(chars), 64, 12, 4, 4, 128, 2000

class Block(nn.Module):
    def __init__(s):
        super().__init__()
        s.ln_1 = nn.LayerNorm(C, bias=False); s.c_attn = nn.Linear(C, 3 * C, bias=False)
        s.c_proj = nn.Linear(C, C, bias=False); s.ln_2 = nn.LayerNorm(C, bias=False)
        s.c_fc = nn.Linear(C, 4 * C, bias=False); s.mlp_proj = nn.Linear(4 * C, C, bias=False)
    def forward(s, x):
        b, t, c = x.shape
        q, k, v = s.c_attn(s.ln_1(x)).split(C, 2)
        q, k, v = [z.view(b, t, H, c // H).transpose(1, 2) for z in (q, k, v)]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + s.c_proj(y)
        return x + s.mlp_proj(F.gelu(s.c_fc(s.ln_2(x))))

class GPT(nn.Module):
    def __init__(s):
        super().__init__()
        s.wte = nn.Embedding(V, C); s.wpe = nn.Embedding(T, C)
        s.h = nn.ModuleList([Block() for _ in range(L)]); s.ln_f = nn.LayerNorm(C, bias=False)
        for name, p in s.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * L) if name.endswith(("c_proj.weight", "mlp_proj.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
    def forward(s, idx):
        x = s.wte(idx) + s.wpe(torch.arange(idx.shape[1]))
        for b in s.h: x = b(x)
        return s.ln_f(x) @ s.wte.weight.t()

def lr_at(it, lr=1e-3, min_lr=1e-4, warmup=100):
    if it < warmup: return lr * (it + 1) / warmup
    r = min(1.0, (it - warmup) / (STEPS - warmup))
    return min_lr + 0.5 * (1 + math.cos(math.pi * r)) * (lr - min_lr)

def val_batches(m, n, gen):
    """Mean loss of `n` random validation batches (nanoGPT's estimate), drawn from `gen`: the
    training batches do not depend on how often the run evaluates."""
    m.eval()
    with torch.no_grad():
        est = []
        for _ in range(n):
            ix = torch.randint(len(val) - T, (B,), generator=gen)
            x = torch.stack([val[i:i + T] for i in ix]); y = torch.stack([val[i + 1:i + T + 1] for i in ix])
            est.append(F.cross_entropy(m(x).view(-1, V), y.view(-1)).item())
    m.train()
    return sum(est) / len(est)

def run(seed):
    torch.manual_seed(seed)
    m = GPT()
    decay = [p for p in m.parameters() if p.dim() >= 2]; rest = [p for p in m.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.99))
    ckpt, gen = tempfile.mkdtemp(prefix="char-twin-"), torch.Generator().manual_seed(seed + 1)
    t0 = time.time()
    for it in range(STEPS):
        for g in opt.param_groups: g["lr"] = lr_at(it)
        ix = torch.randint(len(train) - T, (B,))
        x = torch.stack([train[i:i + T] for i in ix]); y = torch.stack([train[i + 1:i + T + 1] for i in ix])
        loss = F.cross_entropy(m(x).view(-1, V), y.view(-1))
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step()
        if (it + 1) % 250 == 0:
            val_batches(m, 20, gen)
        if (it + 1) % 1000 == 0:
            torch.save({"model": m.state_dict(), "optimizer": opt.state_dict(), "step": it + 1},
                       os.path.join(ckpt, "ckpt.pt"))
    secs = time.time() - t0
    with torch.no_grad():
        starts = list(range(0, len(val) - 1 - T + 1, T))
        tot, cnt = 0.0, 0
        for i in range(0, len(starts), 64):
            s = starts[i:i + 64]
            x = torch.stack([val[j:j + T] for j in s]); y = torch.stack([val[j + 1:j + T + 1] for j in s])
            tot += F.cross_entropy(m(x).view(-1, V), y.view(-1), reduction="sum").item(); cnt += y.numel()
    shutil.rmtree(ckpt)
    return {"seed": seed, "val_loss_full": tot / cnt, "val_loss_20_batches": val_batches(m, 20, gen), "train_seconds": secs}

for seed in [int(a) for a in sys.argv[1:]] or [1337]:
    print(json.dumps(run(seed)), flush=True)
