"""Named SFT variants: a mapping {name, level, any of sft.pear's settings} beside the labels, checked when the job
loads, merged over sft.pear for that variant alone, and written back as it was written."""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pear_ray.cli import app
from pear_ray.config import ConfigError, dump_job, load_job, parse_job
from pear_ray.driver.experiment import cells
from pear_ray.driver.inspect import verdict_levels
from pear_ray.objectives import OnPolicyDistill, PearSft

SMOKE = Path(__file__).resolve().parents[2] / "jobs" / "smoke.yaml"
SIDE_BY_SIDE = ("sft.variants=[none, {name: token-paper, level: token}, "
                "{name: token-wide, level: token, delta_clip: [-1.0, 0.3]}, block]")


def test_a_named_variant_is_sft_pear_with_its_own_settings_over_it():
    job = load_job(SMOKE, ["sft.pear.gamma=0.9", "sft.pear.block_size=2", "score.teacher_topk=4",
                           "sft.variants=[none, {name: wide, level: block+distill, delta_clip: [-1.0, 0.3], "
                           "log_weight_clip: [-3, 2], normalize: weights, target_mode: frozen}]"])
    assert job.sft_variants == ["none", "wide"]
    assert job.sft_objective("wide") == PearSft(level="block", base_loss="distill", gamma=0.9, block_size=2,
                                                delta_clip=(-1.0, 0.3), log_weight_clip=(-3.0, 2.0),
                                                normalize="weights", target_mode="frozen")
    assert job.sft_objective("none") == PearSft(level="none", gamma=0.9, block_size=2)
    assert job.sft.pear == PearSft(gamma=0.9, block_size=2)  # the override is the variant's alone


def test_a_named_variant_without_settings_is_its_level_with_sft_pear_s():
    job = load_job(SMOKE, [SIDE_BY_SIDE, "sft.pear.delta_clip=[-0.2, 0.2]"])
    assert job.sft_variants == ["none", "token-paper", "token-wide", "block"]
    assert job.sft_objective("token-paper") == PearSft(level="token", delta_clip=(-0.2, 0.2))
    assert job.sft_objective("token-wide") == PearSft(level="token", delta_clip=(-1.0, 0.3))
    assert job.sft_objective("block") == PearSft(level="block", delta_clip=(-0.2, 0.2))


def test_the_level_of_a_named_variant_sets_its_modifiers_and_rl_objective():
    job = load_job(SMOKE, ["sft.variants=[none, {name: teacher-wide, level: token+opd, delta_clip: [-1, 1]}]",
                           "rl.objective.clip_high=0.3"])
    variant = job.sft_variant("teacher-wide")
    assert (variant.pear_level, variant.modifiers) == ("token", {"opd"})
    assert job.sft_objective("teacher-wide").base_loss == "nll"
    objective = job.rl_objective("teacher-wide")
    assert isinstance(objective, OnPolicyDistill) and objective.clip_high == 0.3
    assert job.rl_objective("none") == job.rl.objective


def test_a_named_distill_variant_needs_the_teacher_s_top_k():
    with pytest.raises(ConfigError, match="set score.teacher_topk"):
        load_job(SMOKE, ["sft.variants=[none, {name: d, level: token+distill}]"])


def test_a_name_the_job_does_not_list_reads_as_a_label():
    """The stages are also run alone for a label (tests, benchmarks): a label's variant, with sft.pear's settings."""
    job = load_job(SMOKE, ["sft.pear.gamma=0.5"])
    assert job.sft_variants == ["token"]
    assert job.sft_objective("none+distill") == PearSft(level="none", base_loss="distill", gamma=0.5)
    with pytest.raises(ValueError, match=r"no SFT variant is named 'wide' \(the job's: token\)"):
        job.sft_objective("wide")


def test_inspect_judges_the_levels_the_named_variants_train():
    job = load_job(SMOKE, ["sft.variants=[none, {name: a, level: block}, {name: b, level: sequence+opd}, block]",
                           "models.behavior={tiny: {}}"])
    assert verdict_levels(job) == ["block", "sequence"]


@pytest.mark.parametrize(("variants", "expected"), [
    ("[none, {name: w, level: tok}]", r"sft\.variants\.1\.level: Value error, variant 'tok' is not a PEAR level"),
    ("[none, {name: w, level: token, delt_clip: [-1, 0.3]}]", r"sft\.variants\.1\.delt_clip: unknown key"),
    ("[none, {name: w b, level: token}]", r"sft\.variants\.1\.name: String should match pattern"),
    ("[{name: token/wide, level: token}]", r"sft\.variants\.0\.name: String should match pattern .* 'token/wide'"),
    ("[{level: token}]", r"sft\.variants\.0\.name: Field required"),
    ("[token, {name: token, level: token, gamma: 0.5}]", r"variant names \['token'\] are given more than once"),
    ("[{name: none, level: token}]", r"variant 'none' has level 'token': the name 'none' is canonical SFT"),
    ("[{name: none, level: none+distill}]", r"variant 'none' has level 'none\+distill'"),
    ("[{name: w, level: token, gamma: 1.5}]", r"variant 'w': gamma 1\.5: Input should be less than or equal to 1"),
    ("[{name: w, level: token, delta_clip: [0.3, -1]}]", r"variant 'w': delta_clip \(0\.3, -1\.0\): lower bound 0\.3 "
     r"is above upper bound -1\.0"),
])
def test_a_variant_that_cannot_run_is_refused_naming_the_entry(variants, expected):
    with pytest.raises(ConfigError, match=expected) as caught:
        load_job(SMOKE, [f"sft.variants={variants}"])
    assert str(caught.value).count("\n") == 1  # one message


def test_a_flow_mapping_without_a_space_after_a_colon_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="YAML reads 'level:token' as one key with no value; put a space after the "
                                          "colon: level: token"):
        load_job(SMOKE, ["sft.variants=[none, {name: w, level:token}]"])


def test_the_command_line_override_of_named_variants_parses():
    result = CliRunner().invoke(app, ["config", str(SMOKE), "sft.variants=[none,{name: w, level: token, "
                                      "delta_clip: [-1,0.3]}]"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["sft"]["variants"] == ["none", {"name": "w", "level": "token",
                                                                         "delta_clip": [-1.0, 0.3]}]


def test_config_yaml_writes_variants_as_written_and_reads_back_as_the_same_job(tmp_path):
    job = load_job(SMOKE, [SIDE_BY_SIDE])
    dump_job(job, tmp_path / "config.yaml")
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert written["sft"]["variants"] == ["none", {"name": "token-paper", "level": "token"},
                                          {"name": "token-wide", "level": "token", "delta_clip": [-1.0, 0.3]},
                                          "block"]
    assert parse_job(written) == job


def test_every_experiment_cell_keeps_the_named_variants_and_a_grid_on_sft_pear_leaves_their_own_settings():
    job = load_job(SMOKE, [SIDE_BY_SIDE, "seeds=[0, 1]", "grid={sft.pear.delta_clip: [[-0.5, 0.5], [-0.1, 0.1]]}"])
    planned = cells(job)
    assert [folder for _, folder, _ in planned] == [
        "sft.pear.delta_clip=[-0.5, 0.5]/seed0", "sft.pear.delta_clip=[-0.5, 0.5]/seed1",
        "sft.pear.delta_clip=[-0.1, 0.1]/seed0", "sft.pear.delta_clip=[-0.1, 0.1]/seed1"]
    for (_, _, cell), clip in zip(planned, [(-0.5, 0.5)] * 2 + [(-0.1, 0.1)] * 2):
        assert cell.sft_variants == job.sft_variants
        assert cell.sft_objective("token-paper").delta_clip == clip
        assert cell.sft_objective("token-wide").delta_clip == (-1.0, 0.3)
