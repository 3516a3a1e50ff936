"""scripts/bench_runtime.py --parts runs and prints its four figures (the numbers themselves are
what the script is for: speed is printed, never asserted)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_parts_prints_the_adamw_step_and_the_token_draw_both_ways():
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_runtime.py"), "--parts", "--no-smollm2"]
        + ["--repeats", "1", "--threads", "1"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    for part in (
        r"AdamW step, per-tensor loop +[\d.]+ s",
        r"AdamW step, fused +[\d.]+ s",
        r"token draw, torch.multinomial +[\d.]+ ms \(32 rows x [\d,]+\)",
        r"token draw, draw_index +[\d.]+ ms \(32 rows x [\d,]+\)",
    ):
        assert re.search(part, out), (part, out)
