"""Guards the RL path end to end on the proof-world: a real pretrained base model, GRPO through
`run_iteration`, held-out accuracy sampled as the demo samples it. RL must raise held-out
accuracy on the questions the base model could sometimes solve (not hardest), within minutes.

Everything is seeded and runs on one thread, so the figures are the same on every run here."""

from __future__ import annotations

import pytest

from relift_core.algorithm.difficulty import Level
from relift_core.config import load_config
from relift_core.data.examples import load_examples
from relift_core.grading.levels import AnswerSampler, measure_levels, sampled_accuracy
from relift_core.iteration import run_iteration
from relift_core.proofworld.pretrain import pretrain_base_model
from relift_core.proofworld.problems import write_world
from relift_core.runtime.session import build_session

pytestmark = pytest.mark.slow

# The demo's world, base model and RL budget (the toy preset), one seed.
SMALL = [
    "run.iterations=48",
    "run.grader_workers=1",
    "algorithm.name=rl",
    "run.checkpoint_every=1000",
]


def test_rl_raises_heldout_accuracy_on_non_hardest(tmp_path):
    cfg = load_config("toy", [*SMALL, f"run.workdir={tmp_path}"])
    base_dir = tmp_path / "base"
    pretrain_base_model(cfg.data.world, cfg.model.tiny, base_dir)
    paths = write_world(cfg.data.world, tmp_path / "world")
    train, held = load_examples(paths["train"]), load_examples(paths["eval"])

    def run(name: str, iterations: int):
        run_cfg = load_config(
            "toy",
            [
                *SMALL,
                f"run.workdir={tmp_path}",
                f"run.name={name}",
                f"model.init_from={base_dir}",
                f"run.iterations={iterations}",
            ],
        )
        session = build_session(run_cfg, train)
        try:
            sampler = AnswerSampler(session.engine, session.tokenizer, session.grader)
            levels = measure_levels(sampler, held, run_cfg, seed=0)
            for i in range(iterations):
                run_iteration(session, i)
            acc = sampled_accuracy(sampler, held, run_cfg, seed=1)
        finally:
            session.close()
        return levels, acc

    levels, base = run("base", 0)
    _, rl = run("rl", cfg.run.iterations)
    learnable = [u for u, lv in levels.items() if lv is not Level.HARDEST]
    assert len(learnable) >= 30, levels
    gain = sum(rl[u] - base[u] for u in learnable) / len(learnable)
    print(f"RL gain on {len(learnable)} non-hardest held-out questions: {gain:+.3f}")
    assert gain > 0.02, f"RL changed held-out accuracy on non-hardest questions by {gain:+.3f}"
