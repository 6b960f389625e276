"""The job config: YAML + dotted overrides, and refusals that name the key."""

from pathlib import Path

import pytest

from pear_ray.config import ConfigError, apply_override, load_job

JOBS = Path(__file__).resolve().parents[1] / "jobs"


@pytest.mark.parametrize("job_file", sorted(JOBS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_job_file_loads(job_file):
    job = load_job(job_file)
    assert job.name == job_file.stem  # a job file is named after its run folder
    assert job.run_dir == Path(job.output_dir) / job.name


def test_overrides_are_typed_and_nested():
    job = load_job(JOBS / "smoke.yaml", ["sft.pear.level=block", "rl.group_size=3", "eval.k=[1, 2]", "seed=7"])
    assert job.sft.pear.level == "block"
    assert job.rl.group_size == 3
    assert job.eval.k == [1, 2]
    assert job.seed == 7


def test_override_of_a_value_as_a_section_is_refused():
    tree = {"seed": 1}
    with pytest.raises(ConfigError, match="'seed' is a value, not a section"):
        apply_override(tree, "seed.x=2")


def test_override_without_equals_is_refused():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        apply_override({}, "sft.pear.level")


def test_typo_is_refused_with_its_dotted_path(tmp_path):
    job_file = tmp_path / "typo.yaml"
    job_file.write_text("name: x\nmodels: {student: {tiny: {seed: 1}}}\nsft: {pear: {levle: block}}\n")
    with pytest.raises(ConfigError, match=r"sft\.pear\.levle: unknown key"):
        load_job(job_file)


def test_typo_in_override_is_refused():
    with pytest.raises(ConfigError, match=r"rl\.group_sise: unknown key"):
        load_job(JOBS / "smoke.yaml", ["rl.group_sise=4"])


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("sft.pear.level=tokens", "sft.pear.level", "'none', 'sequence', 'token' or 'block'"),
        ("rl.group_size=one", "rl.group_size", "valid integer"),
        ("sft.pear.gamma=1.5", "sft.pear.gamma", "less than or equal to 1"),
        ("sft.pear.delta_clip=[0.3, -0.08]", "sft.pear.delta_clip", "lower bound 0.3 is above upper bound -0.08"),
        ("eval.k=[1, 16]", "eval", "every k must be in 1..n=4"),
        ("resources.learner.zero_stage=4", "resources.learner.zero_stage", "0, 1, 2 or 3"),
        ("models.student.path=/x", "models.student", "exactly one of 'path'"),
        ("models.student.tiny.num_heads=4", "models.student.tiny", "head_dim 16"),
    ],
)
def test_impossible_values_name_the_key_and_the_expectation(override, key, expected):
    with pytest.raises(ConfigError) as caught:
        load_job(JOBS / "smoke.yaml", [override])
    message = str(caught.value)
    assert f"  {key}" in message
    assert expected in message


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_job(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_job(listy)
