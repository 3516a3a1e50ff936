import pytest

from relift_core.config import (
    AlgorithmConfig,
    ConfigError,
    ExperimentConfig,
    list_presets,
    load_config,
)


def test_every_preset_validates():
    assert {"toy", "smollm2-135m", "qwen2.5-math-1.5b", "qwen2.5-math-7b"} <= set(list_presets())
    for name in list_presets():
        assert isinstance(load_config(name), ExperimentConfig)


def test_paper_settings_in_gpu_presets():
    cfg = load_config("qwen2.5-math-7b")
    assert cfg.rollout.n == 8 and cfg.rollout.temperature == 1.0
    assert cfg.algorithm.norm_adv_by_std is False
    assert cfg.algorithm.loss_agg == "seq_sum_div_max_len"
    assert cfg.algorithm.clip_ratio is None and cfg.algorithm.kl_coef == 0
    assert cfg.algorithm.entropy_coef == 0.001 and cfg.rl.grad_clip == 0.7
    assert cfg.rl.lr == cfg.sft.lr == 1e-6
    assert cfg.rl.prompts_per_step == 128 and cfg.rl.mini_batch_size == 64
    assert cfg.algorithm.sft_buffer_threshold == 128 and cfg.sft.mini_batch_size == 128
    assert cfg.eval.temperature == 0.6 and cfg.eval.every == 10


def test_dotted_overrides_are_typed():
    cfg = load_config(
        "toy",
        [
            "rl.lr=1e-5",
            "algorithm.name=rl",
            "run.iterations=3",
            "eval.benchmarks=[math500,gpqa_diamond]",
            "algorithm.clip_ratio=0.2",
        ],
    )
    assert cfg.rl.lr == 1e-5 and cfg.algorithm.name == "rl" and cfg.run.iterations == 3
    assert cfg.eval.benchmarks == ["math500", "gpqa_diamond"] and cfg.algorithm.clip_ratio == 0.2


def test_unknown_key_names_key_and_file():
    with pytest.raises(ConfigError) as e:
        load_config("toy", ["rl.learning_rate=1e-5"])
    assert "rl.learning_rate" in str(e.value) and "toy.yaml" in str(e.value)


def test_wrong_type_names_key_and_file():
    with pytest.raises(ConfigError) as e:
        load_config("toy", ["rollout.n=many"])
    assert "rollout.n" in str(e.value) and "toy.yaml" in str(e.value)


def test_bad_preset_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("run:\n  iterations: -3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "run.iterations" in str(e.value) and str(p) in str(e.value)
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("no-such-preset")


def test_fingerprint_changes_with_config():
    a, b = load_config("toy"), load_config("toy", ["run.seed=1"])
    assert a.fingerprint() == load_config("toy").fingerprint() != b.fingerprint()
    assert a.flat_params()["rl.lr"] == a.rl.lr


@pytest.mark.parametrize(
    "override, key",
    [
        ("algorithm.name=ppo", "algorithm.name"),
        ("algorithm.clip_ratio_high=-0.1", "algorithm.clip_ratio_high"),
        ("algorithm.clip_ratio_high=0.28", "algorithm.clip_ratio_high"),  # no lower bound (toy)
        ("algorithm.kl_coef=-1", "algorithm.kl_coef"),
        ("algorithm.kl_coef=.inf", "algorithm.kl_coef"),
        ("algorithm.kl_estimator=k2", "algorithm.kl_estimator"),
        ("algorithm.dynamic_sampling=sometimes", "algorithm.dynamic_sampling"),
        ("algorithm.dynamic_sampling_max_draws=0", "algorithm.dynamic_sampling_max_draws"),
        ("algorithm.overlong=truncate", "algorithm.overlong"),
        ("algorithm.overlong_buffer_len=0", "algorithm.overlong_buffer_len"),
        ("algorithm.overlong_penalty_factor=-1", "algorithm.overlong_penalty_factor"),
        ("algorithm.off_policy_shaping_gamma=0", "algorithm.off_policy_shaping_gamma"),
        ("algorithm.off_policy_shaping_gamma=.nan", "algorithm.off_policy_shaping_gamma"),
    ],
)
def test_a_bad_value_of_each_method_key_is_one_line_naming_it(override, key):
    with pytest.raises(ConfigError) as e:
        load_config("toy", [override])
    header, *problems = str(e.value).splitlines()
    assert "toy.yaml" in header
    assert len(problems) == 1 and key in problems[0], str(e.value)


def test_soft_overlong_buffer_must_fit_the_response_length():
    with pytest.raises(ConfigError) as e:
        load_config("toy", ["algorithm.name=dapo", "algorithm.overlong_buffer_len=64"])
    _, *problems = str(e.value).splitlines()
    assert len(problems) == 1 and "algorithm.overlong_buffer_len" in problems[0]
    assert "rollout.max_new_tokens=64" in problems[0]


def test_switching_method_by_override_brings_its_settings():
    """The toy preset spells out GRPO's loss; algorithm.name=dapo still means DAPO, and an
    explicit override of one of DAPO's keys still wins."""
    dapo = load_config("toy", ["algorithm.name=dapo"]).algorithm
    assert (dapo.clip_ratio, dapo.clip_ratio_high, dapo.loss_agg) == (0.2, 0.28, "token_mean")
    assert dapo.dynamic_sampling and dapo.overlong == "soft_penalty"
    tuned = load_config(
        "toy", ["algorithm.name=dapo", "algorithm.clip_ratio_high=0.3", "algorithm.overlong=mask"]
    ).algorithm
    assert tuned.clip_ratio_high == 0.3 and tuned.overlong == "mask" and tuned.dynamic_sampling
    luffy = load_config("toy", ["algorithm.name=luffy"]).algorithm
    assert luffy.clip_ratio is None and luffy.loss_agg == "seq_sum_div_max_len"
    # A key the row does not set keeps the preset's value (the toy world's tuned gamma).
    assert luffy.off_policy_shaping_gamma == 0.001
    assert AlgorithmConfig(name="luffy").off_policy_shaping_gamma == 0.1  # LUFFY's default
    # The preset's own method keeps the preset's values.
    relift = load_config("toy", ["algorithm.name=relift"]).algorithm
    assert relift.clip_ratio is None and not relift.dynamic_sampling
    # Each piece on its own, on any method.
    rl = load_config("toy", ["algorithm.name=rl", "algorithm.dynamic_sampling=true"]).algorithm
    assert rl.dynamic_sampling and rl.clip_ratio is None
