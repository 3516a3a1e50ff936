"""One run across ranks (cluster.backend=ray): two CPU ranks joined by gloo, started on a local
Ray by the test. The sharded (ZeRO-1) update must equal the one-process update on the same
batch, and a 2-rank ReLIFT run killed after a checkpoint must resume to the same end state as an
uninterrupted one."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from relift_core.config import load_config
from relift_core.runtime.batches import rl_batch, sft_batch
from relift_core.runtime.models import load_policy
from relift_core.runtime.rollout import Sample
from relift_core.runtime.sharded_trainer import ShardCountError, owners_by_size
from relift_core.runtime.trainer import TorchTrainer

pytestmark = pytest.mark.slow

TWO_RANKS = ["cluster.backend=ray", "cluster.cpu_ranks_per_node=2", "model.init_from=null",
             "data.world.pretrain_examples=0"]


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_owners_by_size_balances_and_is_deterministic():
    sizes = [100, 10, 60, 50, 5, 5]
    owners = owners_by_size(sizes, 2)
    load = [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(2)]
    assert sorted(load) == [115, 115] and owners == owners_by_size(sizes, 2)
    assert owners_by_size([7], 1) == [0]


def _batches(tokenizer, cfg):
    gen = torch.Generator().manual_seed(0)
    samples, advantages = [], []
    for q in range(4):
        prompt = torch.randint(10, 90, (5 + q,), generator=gen).tolist()
        for k in range(4):
            response = torch.randint(10, 90, (3 + (q * 4 + k) % 7,), generator=gen).tolist()
            samples.append(Sample(q, prompt, response, "x", len(response), "length"))
            advantages.append(float((k % 2) * 2 - 1) * (0.5 + q / 4))
    rl = rl_batch(samples, torch.tensor(advantages), tokenizer.pad_token_id)
    prompts = [f"<|im_start|>user\n{a}+{a}<|im_end|>\n<|im_start|>assistant\n" for a in range(6)]
    sft = sft_batch(tokenizer, prompts, [f"{2 * a} is the answer {a}" for a in range(6)],
                    cfg.sft.max_target_tokens)
    return rl, sft


def test_two_ranks_take_the_same_rl_and_sft_steps_as_one_process(local_ray, tiny_overrides):
    from relift_core.runtime.ray_cluster import RayRanks, RayTrainer

    cfg = load_config("toy", [*tiny_overrides, *TWO_RANKS, "rl.micro_batch_size=3",
                              "sft.micro_batch_size=2", "rl.lr=1e-3", "sft.lr=1e-3"])
    model, tokenizer = load_policy(cfg.model, device="cpu", seed=0)
    start = copy.deepcopy(model.state_dict())
    single = TorchTrainer(copy.deepcopy(model), algo=cfg.algorithm, rl=cfg.rl, sft=cfg.sft,
                          max_response_len=cfg.rollout.max_new_tokens)
    rl, sft = _batches(tokenizer, cfg)
    one = [single.rl_step(rl), single.sft_step(sft)]

    ranks = RayRanks(cfg, model)
    try:
        trainer = RayTrainer(ranks, model)
        two = [trainer.rl_step(rl), trainer.sft_step(sft)]
        trainer.gather_weights()
        # Both ranks hold the same weights after the broadcasts.
        rank1 = local_ray.get(ranks.actors[1].local_weights.remote())
        state = trainer.state_dict()
        with pytest.raises(ShardCountError, match=r"3 trainer rank.*this run has 2"):
            trainer.load_state_dict({**state, "world_size": 3})
    finally:
        ranks.close()

    for key, expected in single.model.state_dict().items():
        assert not torch.equal(expected, start[key]), f"{key} did not move"
        torch.testing.assert_close(model.state_dict()[key], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rank1[key], model.state_dict()[key], rtol=0, atol=0)
    for a, b in zip(one, two):
        for key in ("grad_norm", "tokens", "optimizer_steps"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
    assert two[0]["policy_loss"] == pytest.approx(one[0]["policy_loss"], rel=1e-4, abs=1e-6)
    assert two[1]["sft_loss"] == pytest.approx(one[1]["sft_loss"], rel=1e-5)
    # Each rank keeps the optimizer moments of its own share of the parameters only.
    shard_sizes = [len(s["rl_optimizer"]["state"]) for s in state["ranks"]]
    assert sum(shard_sizes) == len(list(model.parameters())) and min(shard_sizes) > 0


# A 3-iteration ReLIFT run on two ranks; prints the end state as JSON. Joins the test's Ray.
# With a 4th argument k it stops after k iterations (checkpoint written), holding its ranks,
# until it is killed.
RUN = textwrap.dedent("""
    import json, sys, time
    import ray
    from relift_core.config import load_config
    from relift_core.data.examples import load_examples
    from relift_core.iteration import run_iteration
    from relift_core.runtime.session import build_session

    overrides, train_path, address = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    ray.init(address=address, configure_logging=False, log_to_driver=False)
    cfg = load_config("toy", overrides)
    session = build_session(cfg, load_examples(train_path))
    try:
        print("resumed at", session.state.iteration, flush=True)
        for i in range(session.state.iteration, cfg.run.iterations):
            run_iteration(session, i)
            print("done", i, flush=True)
            if len(sys.argv) > 4 and i + 1 == int(sys.argv[4]):
                print("holding", flush=True)
                time.sleep(3600)
        s = session.state
        print(json.dumps({"buffer": s.buffer.state_dict(), "ledger": s.ledger.state_dict(),
                          "stream": s.stream.state_dict(), "demos_used": s.demos_used,
                          "sft_steps": s.sft_steps}, sort_keys=True, default=str))
    finally:
        session.close()
""")


def test_two_rank_relift_run_resumes_after_a_kill_to_the_same_state(local_ray, tiny_overrides,
                                                                      tmp_path):
    from relift_core.proofworld.problems import write_world

    address = local_ray.get_runtime_context().gcs_address
    base = [*tiny_overrides, *TWO_RANKS, "algorithm.name=relift", "run.iterations=3",
            "rl.micro_batch_size=6", "sft.micro_batch_size=2", f"run.workdir={tmp_path}"]
    cfg = load_config("toy", base)
    train = write_world(cfg.data.world, tmp_path / "world")["train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(name: str, *hold: str) -> subprocess.Popen:
        args = json.dumps([*base, f"run.name={name}"])
        return subprocess.Popen([sys.executable, "-c", RUN, args, str(train), address, *hold],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env)

    def finish(proc: subprocess.Popen) -> tuple[str, dict]:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
        return out, json.loads(out.strip().splitlines()[-1])

    _, whole = finish(launch("whole"))

    # Killed, ranks and all, after two iterations' checkpoint and before the third iteration.
    killed = launch("killed", "2")
    lines = []
    for line in killed.stdout:
        lines.append(line)
        if line.startswith("holding"):
            break
    assert lines and lines[-1].startswith("holding"), "".join(lines)[-3000:]
    assert (tmp_path / "killed" / "checkpoints" / "step_000002").is_dir()
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)

    out, resumed = finish(launch("killed"))
    assert "resumed at 2" in out, out[-2000:]
    assert resumed == whole
    assert whole["sft_steps"] > 0 and whole["demos_used"] > 0  # ReLIFT fine-tuned on the ranks
    assert Path(tmp_path / "killed" / "checkpoints").exists()
