"""The job config: YAML + dotted overrides, and refusals that name the key."""

from pathlib import Path

import pytest

from pear_ray.config import ConfigError, TransformersOptions, VllmOptions, apply_override, load_job, parse_job

JOBS = Path(__file__).resolve().parents[2] / "jobs"


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
        ("models.behavior.prior={policy: {}, steps: 1}", "models.behavior.prior", "only models.student is given a "
         "prior"),
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


@pytest.mark.parametrize("overrides, expected", [
    (["sft.variants=[tok]"], "variant 'tok' is not a PEAR level"),
    (["sft.variants=[token+distill+distill]"], r"variant 'token\+distill\+distill'"),
    (["sft.variants=[token+distill]"], "set score.teacher_topk"),
    (["sft.variants=[none+opd]", "task.kind=addition", "task.args={}", "models.behavior={scripted: {p_trace: 0.5}}"],
     "on-policy distillation scores the student's samples with the teacher model"),
    (["sft.variants=[none+opd]", "rl.objective={kind: custom, function: 'json:dumps'}"],
     "takes its surrogate settings from rl.objective, which is 'custom'"),
    (["rl.objective.kind=ppo"], "does not match any of the expected tags: 'grpo', 'on_policy_distill', 'custom'"),
    (["rl.clip_high=0.3"], "rl.clip_high: unknown key"),
])
def test_objective_settings_that_cannot_run_are_refused_when_the_job_loads(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_job(JOBS / "smoke.yaml", overrides)


def test_variant_labels_choose_the_objectives():
    job = load_job(JOBS / "smoke.yaml", ["sft.variants=[none,token+distill,block+opd]", "score.teacher_topk=4",
                                         "rl.objective.clip_high=0.3", "sft.pear.gamma=0.9"])
    token = job.sft_objective("token+distill")
    assert (token.level, token.base_loss, token.gamma) == ("token", "distill", 0.9)
    assert job.sft_objective("none").base_loss == "nll"
    assert job.rl_objective("none").kind == "grpo"
    opd = job.rl_objective("block+opd")
    assert opd.kind == "on_policy_distill" and opd.clip_high == 0.3  # the surrogate settings carry over
    assert load_job(JOBS / "smoke.yaml", ["rl.objective.kl_coef=0.1"]).rl.objective.kl_coef == 0.1  # kind grpo


@pytest.mark.parametrize("job_file", sorted(JOBS.glob("*.yaml")), ids=lambda p: p.name)
def test_a_resolved_config_validates_again(job_file):
    """config.yaml and an experiment's cells are the resolved config dumped with every field set: it must load as
    the same job."""
    job = load_job(job_file)
    assert parse_job(job.model_dump(mode="json")) == job


def test_a_job_that_asks_for_gpus_keeps_deepspeed_off_its_cpu_accelerator():
    from pear_ray.runtime import worker_env

    job = load_job(JOBS / "smoke.yaml")
    assert not job.uses_gpu and worker_env(job.uses_gpu)["DS_ACCELERATOR"] == "cpu"
    gpu_job = load_job(JOBS / "smoke.yaml", ["resources.learner.num_gpus=1"])
    assert gpu_job.uses_gpu and "DS_ACCELERATOR" not in worker_env(gpu_job.uses_gpu)


ENGINE = "resources.rollout.engine"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([f"{ENGINE}.backend=transformers", f"{ENGINE}.max_logprobs=30"],
         f"{ENGINE}.max_logprobs: unknown key for 'transformers'"),
        ([f"{ENGINE}.max_rows=8"], f"{ENGINE}.max_rows: unknown key for 'vllm'"),  # no backend: vLLM
        ([f"{ENGINE}.args={{dtype: bfloat16}}"], f"{ENGINE}.args: Value error, ['dtype'] are options of their own"),
        ([f"{ENGINE}.backend=sglang"], "does not match any of the expected tags: 'vllm', 'transformers'"),
        (["resources.rollout.backend=transformers"], "resources.rollout.backend: unknown key"),
    ],
)
def test_an_engine_option_the_backend_does_not_take_is_refused_naming_the_key(overrides, expected):
    with pytest.raises(ConfigError) as caught:
        load_job(JOBS / "smoke.yaml", overrides)
    assert expected in str(caught.value)


def test_engine_options_are_typed_per_backend():
    gpu = load_job(JOBS / "smoke.yaml", [f"{ENGINE}={{dtype: bfloat16, kv_cache_memory_bytes: null, "
                                         "gpu_memory_utilization: 0.85, args: {max_num_seqs: 64}}"]).resources.rollout
    assert isinstance(gpu.engine, VllmOptions)
    assert (gpu.engine.dtype, gpu.engine.kv_cache_memory_bytes, gpu.engine.gpu_memory_utilization) == (
        "bfloat16", None, 0.85)
    assert gpu.engine.args == {"max_num_seqs": 64} and gpu.engine.max_logprobs == 20
    small = load_job(JOBS / "smoke.yaml", [f"{ENGINE}.backend=transformers", f"{ENGINE}.max_rows=16"])
    assert small.resources.rollout.engine == TransformersOptions(max_rows=16)
