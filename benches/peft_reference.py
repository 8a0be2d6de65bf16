#!/usr/bin/env python3
"""The same shapes and variants as burn-lora's benches, timed with PyTorch and PEFT on the CPU.

    python3 -m venv /tmp/peftenv && /tmp/peftenv/bin/pip install torch peft
    /tmp/peftenv/bin/python benches/peft_reference.py            # times, as markdown
    /tmp/peftenv/bin/python benches/peft_reference.py --compare  # and burn-lora / PEFT ratios
    /tmp/peftenv/bin/python benches/peft_reference.py --compare --paired  # against `benches/paired.rs`

Threads equal the machine's cores, f32, eval mode for forwards. `--compare` reads the means of
the last `cargo bench` runs from $CARGO_TARGET_DIR/criterion (default target/criterion), so run
burn-lora's benches on the same machine just before, with the machine otherwise idle. With
`--paired` it reads the medians `cargo bench --bench paired` wrote to
$CARGO_TARGET_DIR/paired.json instead, and skips the merge and mixed-batch rows (which that
bench does not time).
Every time is the mean of repeated calls after warm-up calls, in milliseconds.
"""
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

import peft

torch.manual_seed(0)
torch.set_num_threads(os.cpu_count() or 1)

# Same as benches/linear.rs and benches/adapters.rs.
LAYER_SHAPES = [(32, 128, 1024, 8), (4, 128, 4096, 16)]


def mean_ms(fn, warmup=2, min_time=4.0, min_calls=5):
    for _ in range(warmup):
        fn()
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < min_time:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls * 1e3


class Wrapper(nn.Module):
    """PEFT targets modules by name; one linear layer called `layer`, as in the Rust bench."""

    def __init__(self, d):
        super().__init__()
        self.layer = nn.Linear(d, d)

    def forward(self, x):
        return self.layer(x)


def lora_model(d, rank, adapters=1):
    model = Wrapper(d)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["layer"], init_lora_weights=False)
    model = peft.get_peft_model(model, config)
    for i in range(1, adapters):
        model.add_adapter(f"tenant_{i}", config)
    return model


def train_step_fn(model, x):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(x).mean()
        loss.backward()
        optimizer.step()

    return step


def layer_rows():
    rows = []
    for batch, seq, d, rank in LAYER_SHAPES:
        x = torch.randn(batch, seq, d)
        forward = f"forward_{batch}x{seq}x{d}_r{rank}"
        plain = Wrapper(d).eval()
        unmerged = lora_model(d, rank).eval()
        merged = lora_model(d, rank).eval()
        merged.merge_adapter()
        with torch.no_grad():
            rows.append((forward, "plain", mean_ms(lambda: plain(x))))
            rows.append((forward, "merged", mean_ms(lambda: merged(x))))
            rows.append((forward, "unmerged", mean_ms(lambda: unmerged(x))))

        train = f"train_step_{batch}x{seq}x{d}_r{rank}"
        x_grad = torch.randn(batch, seq, d, requires_grad=True)
        rows.append((train, "full_finetune", mean_ms(train_step_fn(Wrapper(d).train(), x_grad))))
        rows.append((train, "lora", mean_ms(train_step_fn(lora_model(d, rank).train(), x_grad))))
    return rows


def merge_rows():
    d, rank = 4096, 16
    model = lora_model(d, rank).eval()

    def merge_unmerge():
        model.merge_adapter()
        model.unmerge_adapter()

    a, b, w = torch.randn(d, rank), torch.randn(rank, d), torch.randn(d, d)

    def reference():
        merged = w + a @ b
        return merged - a @ b

    with torch.no_grad():
        return [
            (f"merge_{d}x{d}_r{rank}", "merge_unmerge", mean_ms(merge_unmerge)),
            (f"merge_{d}x{d}_r{rank}", "matmul_add_x2", mean_ms(reference)),
        ]


def mixed_rows():
    batch, seq, d, rank = 32, 128, 1024, 8
    model = lora_model(d, rank, adapters=8).eval()
    x = torch.randn(batch, seq, d)
    group = f"mixed_{batch}x{seq}x{d}_r{rank}"
    rows = []
    with torch.no_grad():
        model.set_adapter("default")
        rows.append((group, "single_adapter", mean_ms(lambda: model(x))))
        names = ["default"] + [f"tenant_{i}" for i in range(1, 8)]
        for adapters in [1, 4, 8]:
            routes = [names[i % adapters] for i in range(batch)]
            rows.append((group, f"mixed_{adapters}", mean_ms(lambda: model(x, adapter_names=routes))))
    return rows


class Mha(nn.Module):
    """Burn's MultiHeadAttention: separate query/key/value/output projections."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.output = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, s, d = x.shape
        split = lambda t: t.view(b, s, self.heads, d // self.heads).transpose(1, 2)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(2, 3) / math.sqrt(d // self.heads)
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, d)
        return self.output(context)


class EncoderLayer(nn.Module):
    """Burn's TransformerEncoderLayer with norm_first = false (its default), dropout 0."""

    def __init__(self, d, d_ff, heads):
        super().__init__()
        self.mha = Mha(d, heads)
        self.norm_1 = nn.LayerNorm(d)
        self.linear_inner = nn.Linear(d, d_ff)
        self.linear_outer = nn.Linear(d_ff, d)
        self.norm_2 = nn.LayerNorm(d)

    def forward(self, x):
        x = self.norm_1(x + self.mha(x))
        return self.norm_2(x + self.linear_outer(torch.nn.functional.gelu(self.linear_inner(x))))


class Encoder(nn.Module):
    def __init__(self, d=512, d_ff=2048, heads=8, layers=4):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(d, d_ff, heads) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def stack_rows():
    batch, seq, d, layers, rank = 8, 128, 512, 4, 8
    label = f"{batch}x{seq}x{d}_l{layers}_r{rank}"
    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=["query", "key", "value", "output"])
    x = torch.randn(batch, seq, d)
    plain = Encoder().eval()
    unmerged = peft.get_peft_model(Encoder(), config).eval()
    merged = peft.get_peft_model(Encoder(), config).eval()
    merged.merge_adapter()
    rows = []
    with torch.no_grad():
        rows.append((f"stack_forward_{label}", "plain", mean_ms(lambda: plain(x))))
        rows.append((f"stack_forward_{label}", "merged", mean_ms(lambda: merged(x))))
        rows.append((f"stack_forward_{label}", "unmerged", mean_ms(lambda: unmerged(x))))

    def square_loss(model):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            optimizer.zero_grad(set_to_none=True)
            model(x).pow(2).mean().backward()
            optimizer.step()

        return step

    group = f"stack_train_step_{label}"
    rows.append((group, "full_finetune", mean_ms(square_loss(Encoder().train()))))
    rows.append((group, "lora", mean_ms(square_loss(peft.get_peft_model(Encoder(), config).train()))))
    return rows


def criterion_ms(group, variant):
    target = Path(os.environ.get("CARGO_TARGET_DIR", "target")) / "criterion"
    path = target / group / variant / "new" / "estimates.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())["mean"]["point_estimate"] / 1e6


def paired_ms(group, variant):
    target = Path(os.environ.get("CARGO_TARGET_DIR", "target")) / "paired.json"
    if not target.exists():
        return None
    return json.loads(target.read_text()).get(group, {}).get(variant)


def main():
    compare = "--compare" in sys.argv
    paired = "--paired" in sys.argv
    ours_ms = paired_ms if paired else criterion_ms
    print(f"torch {torch.__version__}, peft {peft.__version__}, {torch.get_num_threads()} threads")
    rows = layer_rows() + stack_rows() if paired else layer_rows() + merge_rows() + mixed_rows() + stack_rows()
    if compare:
        print("| group | variant | PEFT (ms) | burn-lora (ms) | burn-lora / PEFT |")
        print("|---|---|---:|---:|---:|")
    else:
        print("| group | variant | PEFT (ms) |")
        print("|---|---|---:|")
    for group, variant, ms in rows:
        if not compare:
            print(f"| {group} | {variant} | {ms:.2f} |")
            continue
        ours = ours_ms(group, variant)
        ours_text = "" if ours is None else f"{ours:.2f}"
        ratio = "" if ours is None else f"{ours / ms:.2f}"
        print(f"| {group} | {variant} | {ms:.2f} | {ours_text} | {ratio} |")


if __name__ == "__main__":
    main()
