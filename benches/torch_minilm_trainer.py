# PyTorch twin of recipes/minilm-banking77.toml for a whole run: all-MiniLM-L6-v2 fine-tuned on
# BANKING77 with the transformers Trainer, on kiln's schedule. 1,000 training rows held out for
# validation, batches of 32 padded to their longest and grouped by length (windows of 50
# batches: kiln's bucket_by_length), the short last batch left out, AdamW lr 1e-4 weight decay
# 0.01, linear decay after 100 warmup steps, clip 1.0, dropout 0.1, validation every 250 steps,
# then a checkpoint (weights and optimizer state) and the test split (3,080 rows) at the end.
#   usage: python benches/torch_minilm_trainer.py [--epochs N] [--shared DIR]
# Prints one JSON line: wall seconds for the whole run (loading, tokenizing, training,
# evaluating, saving), the Trainer's train_runtime, and the test accuracy.
import argparse, csv, json, os, random, tempfile, time

t0 = time.perf_counter()
import numpy as np
import torch
from transformers import (AutoModelForSequenceClassification, AutoTokenizer,
                          DataCollatorWithPadding, Trainer, TrainingArguments)

ap = argparse.ArgumentParser()
ap.add_argument("--epochs", type=float, default=1.0)
ap.add_argument("--shared", default=os.path.join(os.path.dirname(__file__), "../../shared"))
a = ap.parse_args()
model_dir = os.path.join(a.shared, "data/all-MiniLM-L6-v2")
data_dir = os.path.join(a.shared, "data/banking77")

labels = json.load(open(os.path.join(data_dir, "categories.json")))
label_id = {l: i for i, l in enumerate(labels)}
tok = AutoTokenizer.from_pretrained(model_dir)


def rows(name):
    with open(os.path.join(data_dir, name)) as f:
        return [(r["text"], label_id[r["category"]]) for r in csv.DictReader(f)]


def encode(pairs):
    enc = tok([t for t, _ in pairs], truncation=True, max_length=64)
    return [{"input_ids": i, "attention_mask": m, "labels": l}
            for i, m, (_, l) in zip(enc["input_ids"], enc["attention_mask"], pairs)]


train = rows("train.csv")
random.Random(1337).shuffle(train)
val, train = encode(train[:1000]), encode(train[1000:])
train = train[:len(train) // 32 * 32]  # kiln's loader drops the short last batch
test = encode(rows("test.csv"))

torch.manual_seed(1337)
model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(labels))
out = tempfile.mkdtemp(prefix="minilm-trainer-")
args = TrainingArguments(
    output_dir=out, num_train_epochs=a.epochs, per_device_train_batch_size=32,
    per_device_eval_batch_size=32, learning_rate=1e-4, weight_decay=0.01, warmup_steps=100,
    lr_scheduler_type="linear", max_grad_norm=1.0, train_sampling_strategy="group_by_length",
    eval_strategy="steps", eval_steps=250, save_strategy="no",
    logging_steps=25, report_to="none", use_cpu=True, seed=1337, dataloader_num_workers=0,
    disable_tqdm=True)


def accuracy(p):
    return {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())}


trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                  data_collator=DataCollatorWithPadding(tok), compute_metrics=accuracy)
result = trainer.train()
trainer.save_model(out)
torch.save(trainer.optimizer.state_dict(), os.path.join(out, "optimizer.pt"))
test_metrics = trainer.evaluate(test, metric_key_prefix="test")
print(json.dumps({
    "seconds": time.perf_counter() - t0,
    "train_runtime": result.metrics["train_runtime"],
    "steps": result.global_step,
    "test_accuracy": test_metrics["test_accuracy"],
    "torch": torch.__version__,
    "threads": torch.get_num_threads(),
}), flush=True)
