"""The config reference: docs/config.md is what the schema generates, every key is described, and every key a job
holds is in it."""

import re
from itertools import product
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pear_ray.cli import app
from pear_ray.config import load_job
from pear_ray.config.reference import sections

ROOT = Path(__file__).resolve().parents[2]
REGENERATE = "pear-ray config --reference > docs/config.md (or make docs)"
runner = CliRunner()


def test_docs_config_md_is_what_the_schema_generates():
    result = runner.invoke(app, ["config", "--reference"])
    assert result.exit_code == 0, result.output
    written = (ROOT / "docs" / "config.md").read_text()
    assert written == result.stdout, f"docs/config.md is stale: regenerate it with `{REGENERATE}`"


def test_every_key_of_every_section_a_job_can_hold_has_a_description():
    undescribed = [section.key(name) for section in sections()
                   for name, field in section.model.model_fields.items() if not (field.description or "").strip()]
    assert not undescribed, f"{len(undescribed)} keys have no description=: {', '.join(undescribed)}"


def documented_keys() -> set[str]:
    """Every dotted key the reference names, `{a,b}` groups expanded."""
    keys = set()
    for section in sections():
        for name in section.model.model_fields:
            parts = [part.strip("{}").split(",") for part in re.split(r"\.(?![^{]*\})", section.key(name))]
            keys.update(".".join(choice) for choice in product(*parts))
    return keys


def undocumented(tree: dict, keys: set[str], prefix: str = "") -> list[str]:
    """Keys of a resolved config the reference lacks, looked for in every section: a mapping is a section when the
    reference names keys inside it, else a value (task.args, data.sft_columns) documented whole."""
    missing = []
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and any(documented.startswith(f"{key}.") for documented in keys):
            missing += undocumented(value, keys, f"{key}.")
        elif key not in keys:
            missing.append(key)
    return missing


@pytest.mark.parametrize("job_file", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda path: path.name)
def test_every_key_of_a_resolved_job_is_in_the_reference(job_file):
    tree = load_job(job_file).model_dump(mode="json")
    assert undocumented(tree, documented_keys()) == []


def test_config_wants_a_job_file_or_reference_alone():
    alone = runner.invoke(app, ["config"], env={"COLUMNS": "200"})
    assert alone.exit_code == 2 and "give a job file (or --reference" in alone.output
    both = runner.invoke(app, ["config", str(ROOT / "jobs" / "smoke.yaml"), "--reference"], env={"COLUMNS": "200"})
    assert both.exit_code == 2 and "give no job file with it" in both.output
