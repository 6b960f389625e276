"""Hugging Face sources without a network: models named by Hub id (from a Hub cache built here in the real layout),
revision pinning, a fast clear error for an unknown id, and `datasets` folders / Hub dataset ids as SFT and user
task data, read through the same schema checks as Parquet and JSONL."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import datasets
import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from pear_ray.config import ConfigError, DataConfig, ModelSource, TaskConfig, load_job
from pear_ray.data import schema
from pear_ray.data.io import DataError, load_sft_data, read_table
from pear_ray.engines.rollout_engine import check_model_dir
from pear_ray.hub import SourceNotFound
from pear_ray.models import resolve_model
from pear_ray.tasks.build import make_task

JOBS = Path(__file__).resolve().parents[2] / "jobs"
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hub cache, offline: huggingface_hub and datasets read their settings at import, so patch both."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")
    return cache


def cache_snapshot(cache: Path, repo_id: str, files: dict[str, Path | bytes], commit: str, refs: tuple[str, ...] = (),
                   repo_type: str = "model") -> Path:
    """Put files into the cache as the Hub does: content in blobs/<sha256>, snapshots/<commit>/<name> a relative
    symlink to it, refs/<ref> holding the commit."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for name, content in files.items():
        data = content.read_bytes() if isinstance(content, Path) else content
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def cache_model(cache: Path, model_dir: Path, repo_id: str = "org/tiny") -> tuple[Path, Path]:
    """The tiny model under two commits: A is main, B is tag v1; a REVISION file tells them apart."""
    files = {f.name: f for f in model_dir.iterdir() if f.is_file()}
    return (cache_snapshot(cache, repo_id, {**files, "REVISION": b"A"}, COMMIT_A, ("main",)),
            cache_snapshot(cache, repo_id, {**files, "REVISION": b"B"}, COMMIT_B, ("v1",)))


# ---------------------------------------------------------------- models by Hub id


def test_a_hub_id_resolves_offline_to_its_cached_snapshot(hub_cache, tiny_model_dir, tmp_path):
    main, _ = cache_model(hub_cache, tiny_model_dir)
    folder = resolve_model(ModelSource(path="org/tiny"), tmp_path / "models" / "student")
    assert folder == main and (folder / "REVISION").read_text() == "A"
    check_model_dir(folder)
    # Snapshot files are symlinks into blobs/: what reads the folder (and export_hf's copy2) follows them.
    assert (folder / "config.json").is_symlink()
    assert len(AutoTokenizer.from_pretrained(folder)) == len(AutoTokenizer.from_pretrained(tiny_model_dir))


def test_a_local_folder_wins_over_the_hub_id_it_spells(hub_cache, tiny_model_dir, tmp_path, monkeypatch):
    cache_model(hub_cache, tiny_model_dir)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "tiny").mkdir(parents=True)
    assert resolve_model(ModelSource(path="org/tiny"), tmp_path / "models" / "student") == Path("org/tiny")


def test_a_revision_picks_its_snapshot(hub_cache, tiny_model_dir, tmp_path):
    main, tagged = cache_model(hub_cache, tiny_model_dir)

    def resolved(revision: str | None) -> Path:
        return resolve_model(ModelSource(path="org/tiny", revision=revision), tmp_path / "models" / "student")

    assert resolved(None) == main and resolved("main") == main
    assert resolved("v1") == tagged and (tagged / "REVISION").read_text() == "B"
    assert resolved(COMMIT_A) == main and resolved(COMMIT_B) == tagged
    with pytest.raises(SourceNotFound, match=r"revision 'v2'"):
        resolved("v2")


def test_an_unknown_name_fails_fast_naming_the_key_the_value_and_what_was_tried(hub_cache, tmp_path):
    started = time.monotonic()
    with pytest.raises(SourceNotFound) as error:
        resolve_model(ModelSource(path="org/missing"), tmp_path / "models" / "behavior")
    assert time.monotonic() - started < 3
    message = str(error.value)
    assert message.startswith("models.behavior.path = 'org/missing': not found")
    for tried in ("no folder", f"not in the Hub cache {hub_cache}", "HF_HUB_OFFLINE=1"):
        assert tried in message
    with pytest.raises(SourceNotFound, match=r"models.student.path = '/no/such/model': no such folder, and not a Hub"):
        resolve_model(ModelSource(path="/no/such/model"), tmp_path / "models" / "student")


def test_an_unreachable_hub_fails_fast_without_retries(hub_cache, tmp_path, monkeypatch):
    """Online but nothing answers (a closed local port): one refused question, then the error."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    started = time.monotonic()
    with pytest.raises(SourceNotFound, match=r"not in the Hub cache .*; the Hub at http://127.0.0.1:9 \(ConnectError"):
        resolve_model(ModelSource(path="org/missing"), tmp_path / "models" / "student")
    assert time.monotonic() - started < 3


def test_a_job_names_its_model_by_hub_id(hub_cache, tiny_model_dir, tmp_path):
    _, tagged = cache_model(hub_cache, tiny_model_dir)
    job = load_job(JOBS / "smoke.yaml", ["models.student={path: org/tiny, revision: v1}"])
    assert job.models.student.path == "org/tiny" and job.models.student.revision == "v1"
    assert resolve_model(job.models.student, tmp_path / "models" / "student") == tagged
    with pytest.raises(ConfigError, match="'revision' pins a Hub id"):
        load_job(JOBS / "smoke.yaml", ["models.behavior={tiny: {}, revision: v1}"])


# ---------------------------------------------------------------- datasets


ROWS = [{"question": f"What is {i} + {i}?", "solution": str(2 * i)} for i in range(12)]
MAPPING = {"prompt": "question", "response": "solution"}


def as_jsonl(path: Path, rows: list[dict], names: dict[str, str]) -> Path:
    """The rows under the schema's names, as a JSONL file: what the mapped dataset must read as."""
    path.write_text("".join(json.dumps({ours: row[theirs] for ours, theirs in names.items()}) + "\n" for row in rows))
    return path


def test_a_datasets_folder_with_a_column_mapping_reads_as_the_jsonl(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({k: [r[k] for r in ROWS] for k in ROWS[0]}).save_to_disk(folder)
    split_folder = tmp_path / "ds_dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:3]),
                          "test": datasets.Dataset.from_list(ROWS)}).save_to_disk(split_folder)
    config = DataConfig(sft=str(folder), sft_columns=MAPPING)
    limits = {"max_prompt_tokens": 64, "max_response_tokens": 16}

    expected = load_sft_data(as_jsonl(tmp_path / "sft.jsonl", ROWS, MAPPING), tokenizer, **limits)
    got = load_sft_data(config.sft, tokenizer, split=config.sft_split, columns=config.sft_columns, **limits)
    assert got.num_rows == len(ROWS) and got.equals(expected)
    assert load_sft_data(split_folder, tokenizer, split="test", columns=MAPPING, **limits).equals(expected)
    assert load_sft_data(split_folder, tokenizer, columns=MAPPING, **limits).num_rows == 3  # default: train
    with pytest.raises(DataError, match=r"no split 'dev' \(the dataset has train, test\)"):
        read_table(split_folder, split="dev")


def test_a_datasets_folder_is_a_user_tasks_prompt_file(tmp_path):
    folder = tmp_path / "qa"
    datasets.Dataset.from_list(ROWS).save_to_disk(folder)
    jsonl = as_jsonl(tmp_path / "qa.jsonl", ROWS, {"prompt": "question", "answer": "solution"})
    columns = {"prompt": "question", "answer": "solution"}
    from_folder = make_task(TaskConfig(kind="user", path=str(folder), columns=columns, num_train=8, num_eval=4))
    from_jsonl = make_task(TaskConfig(kind="user", path=str(jsonl), num_train=8, num_eval=4))
    for split in ("train", "eval"):
        got, expected = from_folder.prompts(split), from_jsonl.prompts(split)
        for column in (schema.PROMPT, schema.ANSWER):
            assert got[column].to_pylist() == expected[column].to_pylist()
    with pytest.raises(DataError, match="needs columns 'prompt' and 'answer'"):  # no mapping: the names don't fit
        make_task(TaskConfig(kind="user", path=str(folder), num_eval=4)).prompts("train")


def test_a_bad_column_mapping_or_row_is_named(tiny_model_dir, tmp_path):
    folder = tmp_path / "ds"
    datasets.Dataset.from_list(ROWS).save_to_disk(folder)
    with pytest.raises(DataError, match=rf"{folder}: the column mapping names column\(s\) \['qestion'\] the data lacks"):
        read_table(folder, columns={"prompt": "qestion"})
    bad = tmp_path / "bad"
    datasets.Dataset.from_list([*ROWS[:2], {"question": "", "solution": "1"}]).save_to_disk(bad)
    with pytest.raises(DataError, match=rf"{bad}, row 3, column 'prompt'"):
        make_task(TaskConfig(kind="user", path=str(bad), columns={"prompt": "question", "answer": "solution"},
                             num_eval=1)).prompts("train")
    ids = tmp_path / "ids"
    datasets.Dataset.from_list([{"p": [1, 2], "r": [10**9]}]).save_to_disk(ids)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(schema.SchemaError, match=rf"{ids}, column 'response_ids', row 1"):
        load_sft_data(ids, tokenizer, columns={"prompt_ids": "p", "response_ids": "r"}, max_prompt_tokens=8,
                      max_response_tokens=8)


def test_column_mappings_are_checked_when_the_config_loads():
    with pytest.raises(ValueError, match=r"renames to \['promt'\], which the schema does not know"):
        DataConfig(sft="x", sft_columns={"promt": "q"})
    with pytest.raises(ValueError, match=r"column\(s\) \['q'\] more than one name"):
        TaskConfig(kind="user", columns={"prompt": "q", "answer": "q"})
    with pytest.raises(ValueError, match="describe data.sft"):
        DataConfig(sft_columns={"prompt": "q"})
    with pytest.raises(ValueError, match="not kind 'reasoning_gym'"):
        TaskConfig(split="test")


def test_a_hub_dataset_id_reads_from_the_cache_offline(hub_cache, tmp_path):
    def parquet(rows: list[dict]) -> bytes:
        path = tmp_path / "part.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path.read_bytes()

    cache_snapshot(hub_cache, "org/qa", {"data/train-00000-of-00001.parquet": parquet(ROWS[:5]),
                                         "data/test-00000-of-00001.parquet": parquet(ROWS[5:])},
                   COMMIT_A, ("main",), repo_type="dataset")
    columns = {"prompt": "question", "answer": "solution"}
    assert read_table("org/qa", columns=columns)[schema.PROMPT].to_pylist() == [r["question"] for r in ROWS[:5]]
    assert read_table("org/qa", split="test", columns=columns)[schema.ANSWER].to_pylist() == \
        [r["solution"] for r in ROWS[5:]]
    started = time.monotonic()
    with pytest.raises(DataError, match=r"org/nothing: no such file or folder, and as a Hub dataset id: not found"):
        read_table("org/nothing")
    assert time.monotonic() - started < 3


def test_preflight_checks_a_cached_hub_model_offline_and_names_an_unknown_one(hub_cache, tiny_model_dir):
    from pear_ray.driver.preflight import model_facts

    cache_model(hub_cache, tiny_model_dir)
    facts = model_facts(ModelSource(path="org/tiny"), "models.student")
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert (facts.vocab_size, facts.max_positions) == (config["vocab_size"], config["max_position_embeddings"])
    assert len(facts.tokenizer) == len(AutoTokenizer.from_pretrained(tiny_model_dir))
    with pytest.raises(SourceNotFound, match="models.student.path = 'org/missing'.*HF_HUB_OFFLINE=1"):
        model_facts(ModelSource(path="org/missing"), "models.student")
