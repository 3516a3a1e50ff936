"""Build a preset's world, pretrain its base model, and show how the train questions spread
over the four difficulty levels (per family x size cell), with the pretraining time.

    .venv/bin/python scripts/world_difficulty.py --preset toy
    .venv/bin/python scripts/world_difficulty.py --preset toy --steps 800 data.world.seed=1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from relift_core.config import WorldConfig, load_config
from relift_core.pretrain import (
    PRETRAIN_DEFAULTS,
    load_base_model,
    measure_difficulty,
    pretrain_base_model,
)
from relift_core.world import build_world

LEVELS = ("hardest", "hard", "medium", "easy")


def difficulty_level(acc: float) -> str:
    # The paper's bands (DESIGN.md): 0 | (0, 0.25] | (0.25, 0.75) | [0.75, 1].
    if acc == 0:
        return "hardest"
    if acc <= 0.25:
        return "hard"
    return "medium" if acc < 0.75 else "easy"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="toy")
    ap.add_argument("--steps", type=int, default=PRETRAIN_DEFAULTS.steps)
    ap.add_argument("--lr", type=float, default=PRETRAIN_DEFAULTS.lr)
    ap.add_argument("--batch-size", type=int, default=PRETRAIN_DEFAULTS.batch_size)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="model dir (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.preset, args.overrides)
    world_cfg = cfg.data.world or WorldConfig()
    rollout = cfg.rollout
    world = build_world(world_cfg)
    print("world: " + ", ".join(f"{k}={len(v)}" for k, v in world.items()))

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "base"

        def progress(step: int, total: int, loss: float) -> None:
            if step % 100 == 0 or step == total:
                print(f"  step {step}/{total} loss {loss:.4f}", flush=True)

        stats = pretrain_base_model(
            world_cfg, cfg.model.tiny, out, steps=args.steps, lr=args.lr,
            batch_size=args.batch_size, seed=args.seed, progress=progress,
        )
        print(f"pretrain: {stats['params']:,} params, {stats['steps']} steps, "
              f"loss {stats['initial_loss']:.3f} -> {stats['final_loss']:.4f}, "
              f"{stats['seconds']:.1f}s")
        model, tokenizer = load_base_model(out)
        t0 = time.perf_counter()
        acc = measure_difficulty(
            model, tokenizer, world["train"], n=rollout.n, temperature=rollout.temperature,
            max_new_tokens=rollout.max_new_tokens, seed=args.seed,
        )
        measure_s = time.perf_counter() - t0

    print(f"difficulty of {len(acc)} train questions, n={rollout.n}, "
          f"T={rollout.temperature} ({measure_s:.1f}s)")
    print(f"{'cell':<10}{'mean_acc':>9}" + "".join(f"{lv:>9}" for lv in LEVELS))
    total: Counter[str] = Counter()
    for family in world_cfg.families:
        for size in world_cfg.sizes:
            cell = [p for p in world["train"] if p.family == family and p.size == size]
            if not cell:
                continue
            counts = Counter(difficulty_level(acc[p.uid]) for p in cell)
            total.update(counts)
            mean = sum(acc[p.uid] for p in cell) / len(cell)
            print(f"{family + str(size):<10}{mean:>9.2f}"
                  + "".join(f"{counts[lv]:>9}" for lv in LEVELS))
    print(f"{'all':<10}{sum(acc.values()) / len(acc):>9.2f}"
          + "".join(f"{total[lv]:>9}" for lv in LEVELS))
    print(f"pretraining time: {stats['seconds']:.1f}s")


if __name__ == "__main__":
    main()
