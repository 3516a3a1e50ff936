"""Shared fixtures. Tests that need ../shared skip on a user's clone; CI (RELIFT_REQUIRE_SHARED=1)
turns that skip into a failure so they always run there."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_BENCHMARKS = Path(os.environ.get("RELIFT_SHARED_DIR", REPO.parent / "shared")) / "benchmarks"


@pytest.fixture(scope="session")
def shared_benchmarks() -> Path:
    if not (SHARED_BENCHMARKS / "math_valid.parquet").exists():
        reason = (
            f"needs the evaluation sets in {SHARED_BENCHMARKS} (../shared/benchmarks beside the "
            "repo); a user's clone has none"
        )
        if os.environ.get("RELIFT_REQUIRE_SHARED"):
            pytest.fail(reason + ", and RELIFT_REQUIRE_SHARED is set (CI)")
        pytest.skip(reason)
    return SHARED_BENCHMARKS


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Small models on a 2-core machine run faster on one thread (measured 10-20x under load:
    the second thread fights the grader's worker processes)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def prefect_server():
    """One real Prefect server (the test harness, SQLite) for every test that runs a flow."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# A demo small enough for a test (a few minutes a seed): the demo tests, its console and its
# signals. Every size the assertions (and the run time) depend on is pinned here:
# configs/toy.yaml is tuned as the demo evolves. 8 cells x 24 training questions > 3 iterations
# x 12 prompts, so no question is drawn twice and SFT uses exactly 36 demonstrations.
REDUCED_DEMO = [
    "run.iterations=3",
    "data.world.families=[add,sub,mul,chain]",
    "data.world.sizes=[2,3]",
    "data.world.cells=null",
    "data.world.train_per_cell=24",
    "data.world.eval_per_cell=4",
    "data.world.pretrain_examples=4000",
    "data.world.pretrain_steps=150",
    "rollout.n=8",
    "eval.samples=2",
    "rl.prompts_per_step=12",
    "rl.mini_batch_size=12",
    "run.grader_workers=1",
    "algorithm.sft_buffer_threshold=4",
]


# A toy run small enough for a flow test: a 1-layer model, 12 training questions, 3 iterations.
# Everything the tests below count on is pinned, not taken from configs/toy.yaml (tuned as the
# demo evolves): the world's cells (the dynamics test counts its training questions), the
# evaluated benchmark, a checkpoint every iteration (test_resume kills between them) and the
# iteration at which sft_then_rl switches to RL.
_TINY_RUN = [
    "model.tiny.hidden_size=32",
    "model.tiny.num_layers=1",
    "model.tiny.intermediate_size=64",
    "data.world.families=[add,sub,mul,chain]",
    "data.world.sizes=[2,3]",
    "data.world.cells=null",
    "data.world.train_per_cell=2",
    "data.world.eval_per_cell=1",
    "data.world.pretrain_examples=0",
    "rollout.n=4",
    "rollout.max_new_tokens=24",
    "rl.prompts_per_step=6",
    "rl.mini_batch_size=6",
    "sft.mini_batch_size=4",
    "sft.max_target_tokens=48",
    "algorithm.sft_buffer_threshold=3",
    "algorithm.require_think=false",
    "eval.every=2",
    "eval.max_new_tokens=24",
    "eval.limit=6",
    "eval.samples=2",
    "eval.benchmarks=[world]",
    "algorithm.sft_then_rl_switch=1",
    "run.iterations=3",
    "run.checkpoint_every=1",
    "run.grader_workers=1",
]


@pytest.fixture
def tiny_overrides() -> list[str]:
    """Overrides of the toy preset for flow tests (a fresh list each time: tests extend it)."""
    return list(_TINY_RUN)


@pytest.fixture(scope="module")
def tokenizer():
    """The proof-world's character tokenizer (no download)."""
    from relift_core.runtime.char_tokenizer import build_char_tokenizer

    return build_char_tokenizer()


def _wait_until(predicate, timeout: float, what: str):
    """Poll `predicate` until it returns something truthy (returned), or fail naming `what`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def wait_until():
    return _wait_until


def record_gradients(trainer) -> dict:
    """The gradients of `trainer`'s next optimizer steps, as they are just before each step
    (after accumulation, before clipping): name -> tensor, filled in as the steps run."""
    grads: dict = {}
    step = trainer._clip_and_step

    def record(kind, clip):
        grads.update(
            {
                n: p.grad.detach().clone()
                for n, p in trainer.model.named_parameters()
                if p.grad is not None
            }
        )
        return step(kind, clip)

    trainer._clip_and_step = record
    return grads


# A session small enough to run iterations in seconds: a 1-layer model, 3 training questions a
# cell, no pretraining, one grader worker. Its tests add their method, run name and sizes.
TINY_SESSION = [
    "model.tiny.hidden_size=32",
    "model.tiny.num_layers=1",
    "model.tiny.intermediate_size=64",
    "data.world.train_per_cell=3",
    "data.world.eval_per_cell=1",
    "data.world.pretrain_examples=0",
    "run.grader_workers=1",
]


def world_session(cfg):
    """A training session of `cfg` on its proof world's training questions."""
    from relift_core.data.examples import examples_from_records
    from relift_core.proofworld.problems import build_world, problem_to_record
    from relift_core.runtime.session import build_session

    problems = build_world(cfg.data.world)["train"]
    dataset = examples_from_records(
        [problem_to_record(p, index=i) for i, p in enumerate(problems)], origin="world"
    )
    return build_session(cfg, dataset)


def add1_world(**counts):
    """A proof world of one cell, add/1 (the 100 sums of two digits), pretrained on that cell
    alone; `counts` are its train_per_cell, eval_per_cell and pretrain_examples."""
    from relift_core.config import WorldConfig

    return WorldConfig(
        families=["add"], sizes=[1], pretrain_families=["add"], pretrain_sizes=[1], **counts
    )
