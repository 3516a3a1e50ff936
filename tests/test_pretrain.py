import torch

from relift_core.config import TinyModelConfig
from relift_core.proofworld.pretrain import load_base_model, pretrain_base_model
from tests.conftest import add1_world

TINY = TinyModelConfig(
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    intermediate_size=64,
    max_position_embeddings=128,
)
WORLD = add1_world(train_per_cell=2, eval_per_cell=2, pretrain_examples=64)


def test_pretraining_lowers_the_loss_and_saves_a_loadable_model(tmp_path):
    torch.set_num_threads(1)
    losses: list[float] = []
    stats = pretrain_base_model(
        WORLD,
        TINY,
        tmp_path / "base",
        steps=30,
        lr=5e-3,
        batch_size=8,
        progress=lambda step, total, loss: losses.append(loss),
    )
    assert len(losses) == 30 and stats["final_loss"] < stats["initial_loss"] - 0.5
    assert stats["params"] > 0 and stats["seconds"] > 0
    assert not list(tmp_path.glob(".*"))  # no temp dir left behind
    model, tokenizer = load_base_model(tmp_path / "base")
    # The reloaded tokenizer keeps spaces and newlines (AutoTokenizer would not).
    assert tokenizer.decode(tokenizer("a b\nc")["input_ids"]) == "a b\nc"
    assert model.config.vocab_size == len(tokenizer)
    # Saving again over the same dir replaces it whole.
    pretrain_base_model(WORLD, TINY, tmp_path / "base", steps=1, lr=5e-3, batch_size=8)
    assert load_base_model(tmp_path / "base")[0] is not None
