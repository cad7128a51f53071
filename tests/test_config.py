from pathlib import Path

import pytest

from parallel_r1.config import (
    BASELINE_RECIPE,
    DEFAULT_RECIPE,
    ConfigError,
    default_recipe,
    dump_recipe,
    load_recipe,
    override,
    parse_recipe,
)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
TINY_RECIPE = DEFAULT_RECIPE.read_text()


def test_configs_folder_has_the_paper_recipes():
    names = {p.name for p in CONFIGS}
    assert {"seen.yaml", "unseen_s1.yaml", "unseen_s2.yaml", "mid_training.yaml", "tiny.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_loads(path):
    recipe = load_recipe(path)
    assert recipe.stages[0].model.name_or_path
    assert parse_recipe(dump_recipe(recipe)) == recipe


def test_paper_recipes_use_the_reference_settings():
    s2 = load_recipe(CONFIGS[0].parent / "unseen_s2.yaml")
    dapo = s2.stages[-1]
    assert dapo.variant == "unseen" and dapo.lr == 1e-6
    g = dapo.grpo
    settings = (g.prompts_per_step, g.n, g.mini_batch_size, g.clip_low, g.clip_high, g.kl_coef)
    assert settings == (256, 8, 128, 0.2, 0.28, 0)
    assert (g.reward.kind, g.reward.window, g.reward.parallel_steps) == ("alternating", 10, 2)
    assert g.rollout.max_response_tokens == 3000 and g.rollout.num_paths == 2
    mid = load_recipe(CONFIGS[0].parent / "mid_training.yaml").stages[-1].grpo.reward
    assert mid.kind == "mid_training" and mid.switch_step >= 1


def test_configs_tiny_recipes_are_the_packaged_defaults():
    # The package carries the default recipes (a non-editable install has no configs/ folder); the
    # configs/ entries must be those very files, not copies that drift.
    for name, packaged in (("tiny.yaml", DEFAULT_RECIPE), ("tiny_sequential.yaml", BASELINE_RECIPE)):
        assert (CONFIGS[0].parent / name).resolve() == packaged.resolve()
    assert default_recipe() == load_recipe(CONFIGS[0].parent / "tiny.yaml")


def test_unknown_key_names_file_line_section_and_suggestion():
    text = TINY_RECIPE.replace("      mini_batch_size: 8", "      mini_bach_size: 8")
    line = text.splitlines().index("      mini_bach_size: 8") + 1
    with pytest.raises(ConfigError) as info:
        parse_recipe(text, "my.yaml")
    message = str(info.value)
    assert message.startswith(f"my.yaml:{line}:")
    assert "stages[1].grpo" in message and "'mini_bach_size'" in message and "did you mean 'mini_batch_size'" in message


def test_unknown_top_level_and_literal_typos():
    with pytest.raises(ConfigError, match=r"recipe: unknown key 'stage' \(did you mean 'stages'\?\)"):
        parse_recipe("stage: []\n")
    with pytest.raises(ConfigError, match=r"stages\[0\]\.variant: 'unsen' is not one of .*did you mean 'unseen'"):
        parse_recipe(TINY_RECIPE.replace("variant: seen", "variant: unsen", 1))


def test_wrong_types_and_ranges():
    with pytest.raises(ConfigError, match=r"stages\[1\]\.grpo\.reward: parallel_value must be >= correct_value"):
        parse_recipe(TINY_RECIPE.replace("kind: parallel", "kind: parallel\n        parallel_value: 0.5", 1))
    with pytest.raises(ConfigError, match=r"stages\[0\]\.lr: expected float, got 'fast'"):
        parse_recipe(TINY_RECIPE.replace("lr: 3.0e-3", "lr: fast"))
    with pytest.raises(ConfigError, match=r"stages\[0\]\.sft\.batch_size: expected int"):
        parse_recipe(TINY_RECIPE.replace("batch_size: 32", "batch_size: 3.5"))
    with pytest.raises(ConfigError, match=r"stages\[1\]\.grpo: n must be >= 2"):
        parse_recipe(TINY_RECIPE.replace("      n: 8", "      n: 1"))
    with pytest.raises(ConfigError, match="multiple of mini_batch_size"):
        parse_recipe(TINY_RECIPE.replace("mini_batch_size: 8", "mini_batch_size: 3"))
    with pytest.raises(ConfigError, match="a grpo stage needs max_steps"):
        parse_recipe(TINY_RECIPE.replace("    max_steps: 20\n", ""))
    with pytest.raises(ConfigError, match="kind sft takes no grpo section"):
        parse_recipe(TINY_RECIPE.replace("    sft:\n", "    grpo: {}\n    sft:\n"))
    with pytest.raises(ConfigError, match="first stage .* must name a model"):
        parse_recipe(TINY_RECIPE.replace("      name_or_path: tiny\n", ""))
    vllm = TINY_RECIPE.replace("      rollout:\n", "      rollout:\n        backend: vllm\n", 1)
    assert parse_recipe(vllm).stages[1].grpo.behaviour_logprobs is None  # null: off for vLLM, no error
    with pytest.raises(ConfigError, match=r"stages\[1\]\.grpo: behaviour_logprobs needs the hf backend"):
        parse_recipe(vllm.replace("      n: 8\n", "      n: 8\n      behaviour_logprobs: true\n", 1))


def test_yaml_exponent_without_dot_is_a_float():
    # PyYAML reads 1e-5 as a string; the loader still takes it as the number.
    recipe = parse_recipe(TINY_RECIPE.replace("lr: 3.0e-3", "lr: 1e-5"))
    assert recipe.stages[0].lr == 1e-5


def test_override_by_index_and_by_name():
    recipe = default_recipe()
    new = override(recipe, ["stages.0.lr=1e-5", "stages.rl_easy.grpo.n=4", "stages.rl_hard.grpo.reward.kind=accuracy"])
    assert new.stages[0].lr == 1e-5 and new.stages[1].grpo.n == 4
    assert new.stages[2].grpo.reward.kind == "accuracy" and new.stages[1].grpo.reward.kind == "parallel"
    assert recipe.stages[0].lr == 3e-3  # the original is left alone


def test_override_errors():
    recipe = default_recipe()
    with pytest.raises(ConfigError, match=r"unknown key 'lrr' \(did you mean 'lr'\?\)"):
        override(recipe, ["stages.0.lrr=1"])
    with pytest.raises(ConfigError, match="no stage named 'rl'"):
        override(recipe, ["stages.rl.lr=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        override(recipe, ["stages.0.lr"])
    with pytest.raises(ConfigError, match="clip_low must be in"):
        override(recipe, ["stages.1.grpo.clip_low=1.5"])


def test_sampling_and_reward_checks_live_where_the_values_are_used_and_name_the_line():
    from parallel_r1.evaluate import EvalConfig
    from parallel_r1.rollout import SAMPLING_FIELDS, SamplingParams, sampling_params

    text = TINY_RECIPE.replace("        num_paths: 2\n", "        num_paths: 1\n", 1)
    line = text.splitlines().index("      rollout:") + 1  # the section whose values do not go together
    with pytest.raises(ConfigError, match=rf"my.yaml:{line}: stages\[1\]\.grpo\.rollout: num_paths must be >= 2"):
        parse_recipe(text, "my.yaml")
    with pytest.raises(ValueError, match="num_paths must be >= 2"):
        EvalConfig(num_paths=1)
    window_of_one = TINY_RECIPE.replace("        kind: parallel\n", "        kind: alternating\n        window: 1\n", 1)
    with pytest.raises(ConfigError, match=r"stages\[1\]\.grpo\.reward: .*parallel_steps"):
        parse_recipe(window_of_one)

    # One declaration: the recipe's rollout section, the eval config and the engine's params share the knobs.
    def knobs(settings):
        return {name: getattr(settings, name) for name in SAMPLING_FIELDS}

    rollout = default_recipe().stages[1].grpo.rollout
    params = sampling_params(rollout, variant="seen", seed=3)
    assert knobs(params) == knobs(rollout) and (params.variant, params.seed) == ("seen", 3)
    assert knobs(EvalConfig()) == knobs(SamplingParams())
