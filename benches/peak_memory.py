#!/usr/bin/env python3
"""Peak memory of each transformer-stack variant, each in a process of its own.

Runs `examples/peak_memory.rs` once per variant (build it first with
`cargo build --release --example peak_memory`) and prints a markdown table of peak RSS with the
ratio against the variant's baseline: full fine-tuning for training, the plain model for
inference; DoRA and QLoRA against f32 LoRA. The LoRA training target is a ratio of at most 0.6,
and so is 4-bit QLoRA's against f32 LoRA's.
"""
import os
import subprocess
import sys
from pathlib import Path

target = Path(os.environ.get("CARGO_TARGET_DIR", "target"))
binary = target / "release" / "examples" / "peak_memory"

# (variant, baseline, target ratio or None)
ROWS = [
    ("full_finetune_train", "full_finetune_train", None),
    ("lora_train", "full_finetune_train", 0.6),
    ("burn_apply_lora_train", "full_finetune_train", None),
    ("dora_train", "lora_train", None),
    ("qlora_train", "lora_train", None),
    ("qlora4_train", "lora_train", 0.6),
    ("plain_forward", "plain_forward", None),
    ("merged_forward", "plain_forward", None),
    ("unmerged_forward", "plain_forward", None),
    ("burn_apply_lora_forward", "plain_forward", None),
    ("qlora_forward", "unmerged_forward", None),
    ("qlora4_forward", "unmerged_forward", None),
]


def peak(variant: str) -> float:
    out = subprocess.run([str(binary), variant], capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


def main() -> int:
    if not binary.exists():
        print(f"build {binary} first: cargo build --release --example peak_memory", file=sys.stderr)
        return 1
    peaks = {variant: peak(variant) for variant, _, _ in ROWS}
    print("| variant | peak RSS (MiB) | baseline | ratio | target | met |")
    print("|---|---:|---|---:|---:|:---:|")
    for variant, baseline, goal in ROWS:
        ratio = peaks[variant] / peaks[baseline]
        met = "" if goal is None else ("yes" if ratio <= goal else "**no**")
        goal_text = "" if goal is None else f"≤ {goal:.2f}"
        print(f"| {variant} | {peaks[variant]:.1f} | {baseline} | {ratio:.3f} | {goal_text} | {met} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
