"""Hugging Face sources without a network: models named by Hub id (from a Hub cache built here in the real layout),
revision pinning, and a fast clear error for an unknown id."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
from transformers import AutoTokenizer

from pear_ray.config import ConfigError, ModelSource, load_job
from pear_ray.engines.vllm_engine import check_model_dir
from pear_ray.hub import SourceNotFound
from pear_ray.models import resolve_model

JOBS = Path(__file__).resolve().parent.parent / "jobs"
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hub cache, offline: huggingface_hub reads its settings at import, so patch them too."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
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
