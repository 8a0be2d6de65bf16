#!/usr/bin/env python3
"""Print the ratios of the `linear` and `adapters` benches as markdown, from criterion's saved estimates.

Run after `cargo bench --bench linear` and `cargo bench --bench adapters`. Reads $CARGO_TARGET_DIR/criterion (default: target/).
Each ratio divides two means measured in the same run.
"""
import json
import os
import sys
from pathlib import Path

target = Path(os.environ.get("CARGO_TARGET_DIR", "target")) / "criterion"

# (group prefix, variant, baseline, target ratio or None)
RATIOS = [
    ("forward", "merged", "plain", 1.02),
    ("forward", "unmerged", "plain", None),  # target depends on the shape, see below
    ("forward", "dense", "plain", None),
    ("forward", "burn_apply_lora", "plain", None),
    ("forward", "unmerged", "burn_apply_lora", 0.80),
    ("train_step", "lora", "full_finetune", 0.70),
    ("train_step", "lora", "burn_apply_lora", 0.75),
    ("train_step", "dense", "full_finetune", None),
    ("train_step", "burn_apply_lora", "full_finetune", None),
    # The target is 2x one product plus one add; the baseline does that twice (merge, unmerge).
    ("merge", "merge_unmerge", "matmul_add_x2", 2.0),
    # Throughput >= 0.8 of one adapter for the whole batch: time ratio <= 1/0.8.
    ("mixed", "mixed_1", "single_adapter", None),
    ("mixed", "mixed_4", "single_adapter", 1.25),
    ("mixed", "mixed_8", "single_adapter", 1.25),
    ("switch", "set_active", "reload", None),
    ("stack_forward", "merged", "plain", 1.02),
    ("stack_forward", "unmerged", "plain", None),
    ("stack_forward", "burn_apply_lora", "plain", None),
    ("stack_forward", "unmerged", "burn_apply_lora", 0.80),
    ("stack_train_step", "lora", "full_finetune", 0.70),
    ("stack_train_step", "lora", "burn_apply_lora", 0.75),
    ("stack_train_step", "burn_apply_lora", "full_finetune", None),
    ("stack_forward", "dora_unmerged", "unmerged", None),
    ("stack_forward", "qlora_unmerged", "unmerged", None),
    ("stack_train_step", "dora", "lora", None),
    ("stack_train_step", "qlora", "lora", None),
]
UNMERGED_TARGETS = {"forward_32x128x1024_r8": 1.10, "forward_4x128x4096_r16": 1.05}


def mean_ms(group: str, name: str):
    path = target / group / name / "new" / "estimates.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())["mean"]["point_estimate"] / 1e6


def main() -> int:
    if not target.exists():
        print(f"no criterion results under {target}", file=sys.stderr)
        return 1
    groups = sorted(p.name for p in target.iterdir() if p.is_dir() and p.name != "report")
    print("| group | variant | mean (ms) | baseline | baseline (ms) | ratio | target | met |")
    print("|---|---|---:|---|---:|---:|---:|:---:|")
    for group in groups:
        for prefix, variant, baseline, goal in RATIOS:
            if not group.startswith(prefix + "_"):
                continue
            if prefix == "forward" and variant == "unmerged" and baseline == "plain":
                goal = UNMERGED_TARGETS.get(group)
            value, base = mean_ms(group, variant), mean_ms(group, baseline)
            if value is None or base is None:
                continue
            ratio = value / base
            met = "" if goal is None else ("yes" if ratio <= goal else "**no**")
            goal_text = "" if goal is None else f"≤ {goal:.2f}"
            print(f"| {group} | {variant} | {value:.2f} | {baseline} | {base:.2f} | {ratio:.3f} | {goal_text} | {met} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
