import json
import subprocess
import sys
from pathlib import Path

import pytest

from parallel_r1.config import (
    BASELINE_RECIPE,
    DEFAULT_RECIPE,
    RECIPES,
    ConfigError,
    StageConfig,
    default_recipe,
    dump_recipe,
    load_recipe,
    override,
    parse_recipe,
    recipe_to_dict,
)
from parallel_r1.settings import DEFAULT_VARIANT, EvalConfig, EvalSettings, SamplingParams, StudySettings

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
# The whole of the default recipe in one file (tiny.yaml extends it), for tests that edit its lines.
TINY_RECIPE = (RECIPES / "study" / "base.yaml").read_text()


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
    from parallel_r1.rollout import SAMPLING_FIELDS, sampling_params

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


def test_the_configuration_layer_imports_nothing_else_of_the_package_and_no_torch():
    code = (
        "import sys; import parallel_r1.config, parallel_r1.settings; "
        "print(sorted(m for m in sys.modules if m.startswith('parallel_r1') or m.split('.')[0] == 'torch'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    layer = ["parallel_r1", "parallel_r1.config", "parallel_r1.settings", "parallel_r1.typed_yaml"]
    assert out.strip() == str(layer)


def test_one_default_variant():
    assert StageConfig(name="s", kind="sft").variant == DEFAULT_VARIANT
    assert SamplingParams().variant == EvalConfig().variant == DEFAULT_VARIANT


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"problems_per_level": 0}, "problems_per_level must be >= 1"),
        ({"levels": ()}, "levels must name at least one level"),
        ({"levels": (0, 2)}, "levels must be >= 1"),
        ({"task": "chess"}, "task must be one of arith, search"),
        ({"k": 0}, "k must be >= 1"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"temperature": -1.0}, "temperature must be >= 0"),
    ],
)
def test_eval_settings_are_checked_when_built(changes, message):
    with pytest.raises(ConfigError, match=message):
        EvalSettings(**changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"arms": ()}, "at least one arm"),
        ({"arms": ("seen", "seen")}, "arms must be distinct"),
        ({"arms": ("seen", "unsen")}, r"unknown study arm\(s\) unsen"),
        ({"seeds": ()}, "at least one seed"),
        ({"seeds": (1, 1)}, "seeds must be distinct"),
        ({"seeds": (-1,)}, "seeds must be integers >= 0"),
        ({"eval": {"k": 2}}, "eval must be an EvalSettings"),
    ],
)
def test_study_settings_are_checked_when_built(changes, message):
    with pytest.raises(ConfigError, match=message):
        StudySettings(**changes)


def test_a_study_folder_of_its_own_may_name_arms_of_its_own(tmp_path):
    assert StudySettings(arms=("mine",), recipes_dir=tmp_path).arms == ("mine",)


def test_evaluation_defaults_are_declared_once_per_command():
    # `eval` samples more per problem than the evaluation after every stage of `run` and `study`.
    assert (EvalConfig().k, EvalConfig().max_batch_size) == (16, 64)
    assert (EvalSettings().k, EvalSettings().batch_size) == (4, 128)
    assert (EvalSettings().temperature, EvalSettings().seed) == (EvalConfig().temperature, EvalConfig().seed)


RECIPE_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "recipes.json"


@pytest.mark.parametrize("name", sorted(json.loads(RECIPE_FIXTURE.read_text())))
def test_the_embedded_recipes_load_as_they_did_before_they_extended_a_base(name):
    # recipes.json: every embedded recipe as it loaded when each was a complete copy of its settings.
    assert recipe_to_dict(load_recipe(RECIPES / name)) == json.loads(RECIPE_FIXTURE.read_text())[name]


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_a_recipe_extends_another_and_states_what_differs(tmp_path):
    _write(tmp_path, "base.yaml", TINY_RECIPE)
    child = _write(
        tmp_path,
        "child.yaml",
        "extends: base.yaml\n"
        "name: child\n"
        "stages:\n"
        "  - name: rl_easy\n"
        "    data: {task_levels: [3]}\n"  # a list replaces the base's
        "    grpo:\n"
        "      rollout: {max_blocks: 1}\n"  # a mapping merges into the base's
        "  - {name: rl_extra, kind: grpo, max_steps: 2}\n",  # a new stage name adds a stage
    )
    base, recipe = parse_recipe(TINY_RECIPE), load_recipe(child)
    assert recipe.name == "child" and [s.name for s in recipe.stages] == ["sft", "rl_easy", "rl_hard", "rl_extra"]
    easy, base_easy = recipe.stages[1], base.stages[1]
    assert easy.data.task_levels == [3] and easy.data.task_size == base_easy.data.task_size
    assert (
        easy.grpo.rollout.max_blocks == 1
        and easy.grpo.rollout.max_path_tokens == base_easy.grpo.rollout.max_path_tokens
    )
    assert recipe.stages[0] == base.stages[0] and recipe.stages[2] == base.stages[2]
    assert recipe.stages[3].grpo == StageConfig(name="x", kind="grpo", max_steps=2).grpo
    # A chain: what the middle file sets holds unless the last one sets it again.
    _write(tmp_path, "grandchild.yaml", "extends: child.yaml\nseed: 3\n")
    assert load_recipe(tmp_path / "grandchild.yaml") == override(recipe, ["seed=3"])


def test_errors_of_an_extending_recipe_name_the_file_and_line_that_wrote_the_value(tmp_path):
    base = _write(tmp_path, "base.yaml", TINY_RECIPE)
    child = _write(tmp_path, "child.yaml", "extends: base.yaml\nstages:\n  - name: rl_easy\n    lrr: 1\n")
    with pytest.raises(ConfigError, match=rf"^{child}:4: stages\[1\]: unknown key 'lrr' \(did you mean 'lr'\?\)"):
        load_recipe(child)
    base.write_text(TINY_RECIPE.replace("      n: 8\n", "      n: 1\n", 1))
    child.write_text("extends: base.yaml\nstages:\n  - name: rl_easy\n    lr: 1.0e-4\n")
    section = TINY_RECIPE.splitlines().index("    grpo:") + 1  # rl_easy's grpo section, in the base file
    with pytest.raises(ConfigError, match=rf"^{base}:{section}: stages\[1\]\.grpo: n must be >= 2"):
        load_recipe(child)


def test_extends_refuses_cycles_missing_files_and_text_without_a_folder(tmp_path):
    _write(tmp_path, "a.yaml", "extends: b.yaml\n")
    _write(tmp_path, "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match=r"extends itself through a.yaml -> b.yaml -> a.yaml"):
        load_recipe(tmp_path / "a.yaml")
    _write(tmp_path, "self.yaml", "name: x\nextends: self.yaml\n")
    with pytest.raises(ConfigError, match=r"extends itself through self.yaml -> self.yaml"):
        load_recipe(tmp_path / "self.yaml")
    missing = _write(tmp_path, "c.yaml", "name: c\nextends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=rf"^{missing}:2: extends 'nowhere.yaml': no such recipe file"):
        load_recipe(missing)
    _write(tmp_path, "d.yaml", "extends: [a.yaml]\n")
    with pytest.raises(ConfigError, match=r"d.yaml:1: extends: expected the path of a recipe file"):
        load_recipe(tmp_path / "d.yaml")
    with pytest.raises(ConfigError, match="extends needs a recipe file"):
        parse_recipe("extends: a.yaml\n")


def test_a_linked_recipe_extends_relative_to_the_file_it_links_to(tmp_path):
    (tmp_path / "tiny.yaml").symlink_to(DEFAULT_RECIPE)
    assert load_recipe(tmp_path / "tiny.yaml") == default_recipe()


@pytest.mark.parametrize(
    ("variant", "rollout"),
    [("threads", "{max_depth: 2}"), ("unseen", "{max_depth: 2, backend: vllm}"), ("unseen", "{max_depth: 0}")],
)
def test_nesting_is_checked_at_load(variant, rollout):
    text = f"""
name: nest
stages:
  - name: rl
    kind: grpo
    variant: {variant}
    max_steps: 1
    grpo:
      rollout: {rollout}
"""
    with pytest.raises(ConfigError, match="max_depth"):
        parse_recipe(text)


@pytest.mark.parametrize("rollout", ["{distinct_plans: true}", "{plans: true, distinct_plans: true, backend: vllm}"])
def test_distinct_plans_are_checked_at_load(rollout):
    """distinct_plans needs plans (it bans at plan lines) and the hf engine (vLLM samples a plan whole)."""
    text = f"""
name: distinct
stages:
  - name: rl
    kind: grpo
    variant: unseen
    model: {{name_or_path: tiny}}
    max_steps: 1
    grpo:
      rollout: {rollout}
"""
    with pytest.raises(ConfigError, match="distinct_plans"):
        parse_recipe(text)
    assert parse_recipe(text.replace("distinct_plans: true", "distinct_plans: false"))
