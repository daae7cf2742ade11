import pytest

import accel.registry as stage_mod
from accel.core.artifact import artifact_key
from accel.core.errors import RecipeError
from accel.recipe import load_recipe, plan_keys

import fake_stages

GOOD = """
name = "demo"
source = "teacher"
target = "cpu"

[[stages]]
stage = "shrink"
steps = 2

[[stages]]
stage = "export"
opset_version = 18

[[stages]]
stage = "compile"
"""


@pytest.fixture(autouse=True)
def fake_table(monkeypatch):
    monkeypatch.setattr(stage_mod, "STAGES", dict(fake_stages.TABLE))


@pytest.fixture
def recipe_dir(tmp_path):
    for sub, name in (("unet", "config.json"), ("scheduler", "scheduler_config.json")):
        (tmp_path / "teacher" / sub).mkdir(parents=True)
        (tmp_path / "teacher" / sub / name).write_text("{}")
    return tmp_path


def load(recipe_dir, text):
    path = recipe_dir / "recipe.toml"
    path.write_text(text)
    return load_recipe(path)


def problems(recipe_dir, text) -> str:
    with pytest.raises(RecipeError) as e:
        load(recipe_dir, text)
    return str(e.value)


def test_valid_recipe(recipe_dir):
    recipe = load(recipe_dir, GOOD)
    assert recipe.name == "demo"
    assert recipe.source == (recipe_dir / "teacher").resolve()
    assert recipe.target.name == "cpu"
    assert [p.stage.name for p in recipe.stages] == ["shrink", "export", "compile"]
    assert [p.index for p in recipe.stages] == [0, 1, 2]
    assert recipe.stages[0].config.steps == 2
    assert recipe.stages[1].config.dynamic_batch is True


def test_plan_keys_chain_and_target(recipe_dir):
    recipe = load(recipe_dir, GOOD)
    keys = plan_keys(recipe, "src")
    assert keys[0] == artifact_key("shrink", 1, {"steps": 2, "learning_rate": 1e-4}, "src")
    assert keys[2] == artifact_key(
        "compile", 2, {"optimization_level": 99}, keys[1], recipe.target.fingerprint
    )
    assert keys == plan_keys(load(recipe_dir, GOOD), "src")
    assert plan_keys(load(recipe_dir, GOOD.replace("steps = 2", "steps = 3")), "src")[1] != keys[1]


def test_unknown_top_level_key_names_closest(recipe_dir):
    msg = problems(recipe_dir, GOOD.replace('target = "cpu"', 'target = "cpu"\ntargte = "x"'))
    assert "unknown top-level key 'targte'; did you mean 'target'?" in msg


def test_unknown_stage_config_key_names_closest(recipe_dir):
    msg = problems(recipe_dir, GOOD.replace("opset_version = 18", "opset_verison = 18"))
    assert "stages[1] (export): unknown key 'opset_verison'; did you mean 'opset_version'?" in msg
    msg = problems(recipe_dir, GOOD.replace("steps = 2", "zzz = 2"))
    assert "stages[0] (shrink): unknown key 'zzz'; valid keys: steps, learning_rate" in msg


def test_bad_stage_config_value(recipe_dir):
    msg = problems(recipe_dir, GOOD.replace("opset_version = 18", "opset_version = 11"))
    assert (
        "stages[1] (export): key 'opset_version': Input should be greater than or equal to 18"
        in msg
    )
    assert "(got 11)" in msg


def test_unknown_stage_name(recipe_dir):
    msg = problems(recipe_dir, GOOD.replace('stage = "export"', 'stage = "exprot"'))
    assert "stages[1]: unknown stage 'exprot'; did you mean 'export'?" in msg
    assert "known stages: compile, export, shrink" in msg


def test_bad_chain(recipe_dir):
    msg = problems(
        recipe_dir, GOOD.replace('stage = "export"\nopset_version = 18', 'stage = "shrink"')
    )
    assert (
        "stages[2] (compile) consumes 'onnx' but the previous stage (shrink) produces 'checkpoint'"
        in msg
    )
    first = GOOD.replace('stage = "shrink"\nsteps = 2', 'stage = "compile"')
    assert (
        "stages[0] (compile) consumes 'onnx' but the source checkpoint produces 'checkpoint'"
        in (problems(recipe_dir, first))
    )


def test_missing_source_dir(recipe_dir):
    msg = problems(recipe_dir, GOOD.replace('"teacher"', '"nowhere"'))
    assert f"source: {recipe_dir.resolve() / 'nowhere'} does not exist" in msg
    (recipe_dir / "empty").mkdir()
    assert "not a diffusers pipeline directory" in problems(
        recipe_dir, GOOD.replace('"teacher"', '"empty"')
    )


def test_all_problems_in_one_error(recipe_dir):
    text = (
        GOOD.replace('name = "demo"', "")
        .replace('"teacher"', '"nowhere"')
        .replace('target = "cpu"', 'target = "cpux"')
        .replace("opset_version = 18", "opset_verison = 18")
        .replace('stage = "compile"', 'stage = "compiel"')
    )
    msg = problems(recipe_dir, text)
    assert "(5 problems)" in msg
    for part in [
        "missing required top-level key 'name'",
        "source: ",
        "target: unknown target 'cpux'; did you mean 'cpu'?",
        "unknown key 'opset_verison'",
        "unknown stage 'compiel'",
    ]:
        assert part in msg


def test_bad_toml_and_missing_file(recipe_dir):
    msg = problems(recipe_dir, GOOD.replace("[[stages]]", "[[stages]", 1))
    assert "is not valid TOML" in msg and "line" in msg
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(recipe_dir / "nope.toml")


def test_wrong_types_and_empty_stages(recipe_dir):
    msg = problems(recipe_dir, 'name = 3\nsource = "teacher"\ntarget = "cpu"\nstages = []\n')
    assert "'name' must be a string, got 3" in msg
    assert "'stages' is empty" in msg


BRANCH = (
    GOOD.replace('stage = "export"', 'stage = "export"\nid = "graph"')
    + """
[[stages]]
stage = "compile"
after = "graph"
optimization_level = 1
"""
)


def test_a_stage_can_branch_from_an_earlier_one_by_id(recipe_dir):
    recipe = load(recipe_dir, BRANCH)
    assert [p.parent for p in recipe.stages] == [None, None, None, 1]
    keys = plan_keys(recipe, "src")
    assert keys[3] == artifact_key(
        "compile", 2, {"optimization_level": 1}, keys[1], recipe.target.fingerprint
    )
    assert keys[:3] == plan_keys(load(recipe_dir, GOOD), "src")


def test_branch_errors_name_the_missing_id_and_the_kind_mismatch(recipe_dir):
    text = problems(recipe_dir, BRANCH.replace('after = "graph"', 'after = "grpah"'))
    assert "after = 'grpah' names no earlier stage" in text and "'graph'" in text
    shrunk = BRANCH.replace('stage = "shrink"', 'stage = "shrink"\nid = "small"')
    text = problems(recipe_dir, shrunk.replace('after = "graph"', 'after = "small"'))
    assert "consumes 'onnx' but stage 'small' (shrink) produces 'checkpoint'" in text
    text = problems(
        recipe_dir, BRANCH.replace('stage = "compile"\n', 'stage = "compile"\nid = "graph"\n', 1)
    )
    assert "id 'graph' must be a string no other stage uses" in text


def test_after_must_name_an_id(recipe_dir):
    text = problems(recipe_dir, BRANCH.replace('after = "graph"', 'after = ["graph"]'))
    assert "after must be the id string of an earlier stage" in text
