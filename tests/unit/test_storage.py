"""Run folders on object storage (pear_ray/storage.py) against an S3 server on loopback: publishing and fetching,
the scratch copy as a cache of the bucket, checkpoints committed files first, then manifest, then `latest` and an
interrupted upload passed over, and no credential in any message."""

import json
import logging
import pickle
import socket
import time
import uuid
from pathlib import Path

import pytest
from support.stores import ACCESS_KEY_ID, SECRET_ACCESS_KEY, ObjectStore, moto_server

from pear_ray import storage
from pear_ray.engines import checkpoints
from pear_ray.storage import RunFolder, StorageError


@pytest.fixture(params=["s3", "gs"])
def store(request, monkeypatch, tmp_path) -> ObjectStore:
    """This process pointed at one of the module's stores (moto's S3, the GCS emulator), with a scratch folder of the
    test's own: the layer's behaviour is the same on both."""
    store = request.getfixturevalue("s3" if request.param == "s3" else "gcs")
    for name, value in store.env(PEAR_RAY_SCRATCH=str(tmp_path / "scratch")).items():
        monkeypatch.setenv(name, value)
    return store


@pytest.fixture
def bucket(store) -> str:
    """A bucket of the test's own."""
    return store.create_bucket(f"bucket-{uuid.uuid4().hex[:12]}")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def uploads(caplog) -> list[str]:
    """The keys uploaded, in order (the storage layer logs each upload)."""
    return [record.args[1] for record in caplog.records if record.getMessage().startswith("uploaded ")]


def test_a_folder_in_a_bucket_maps_to_a_scratch_copy_and_back(store, tmp_path):
    folder = RunFolder("s3://runs/jobs/smoke/", skip=("checkpoints",))
    assert folder.location == "s3://runs/jobs/smoke"
    assert folder.local == tmp_path / "scratch" / "s3" / "runs" / "jobs" / "smoke"
    assert folder.where(folder.local / "data" / "sft.parquet") == "s3://runs/jobs/smoke/data/sft.parquet"
    assert folder.where(folder.local.parent / "priors" / "p") == "s3://runs/jobs/priors/p"  # outside: same bucket
    assert storage.join("s3://runs/jobs/", "smoke") == "s3://runs/jobs/smoke"
    assert storage.join("runs", "smoke") == str(Path("runs/smoke"))
    local = RunFolder(tmp_path / "run")
    assert local.remote is None and local.local == tmp_path / "run" and local.where(tmp_path / "x") == str(tmp_path / "x")
    with pytest.raises(ValueError, match=r"no '\.' or '\.\.'"):
        RunFolder("s3://runs/../etc")


def test_publish_uploads_the_folder_less_what_it_skips_and_only_what_changed(bucket, store, caplog):
    folder = RunFolder(f"{store.scheme}://{bucket}/run", skip=("checkpoints", "state.json"))
    write(folder.local / "metrics.jsonl", "{}\n")
    write(folder.local / "models" / "sft" / "model.safetensors", "weights")
    write(folder.local / "models" / "rl.partial" / "model.safetensors", "half of an export")
    write(folder.local / "checkpoints" / "sft" / "step3" / "rng_rank0.pt", "the ranks upload these")
    write(folder.local / "state.json", "{}")
    with caplog.at_level(logging.DEBUG, logger=storage.__name__):
        folder.publish()
        assert store.objects(f"{bucket}/run") == {"metrics.jsonl": 3, "models/sft/model.safetensors": 7}
        caplog.clear()
        folder.publish()
        assert uploads(caplog) == []  # nothing changed
        write(folder.local / "metrics.jsonl", "{}\n{}\n")
        folder.publish()
        assert uploads(caplog) == [f"{bucket}/run/metrics.jsonl"]
        folder.publish(folder.local / "state.json")  # named: published whatever `skip` says
    assert store.read(f"{bucket}/run/state.json") == b"{}"


def test_fetch_brings_a_file_or_folder_from_the_bucket_into_a_fresh_scratch(bucket, store, monkeypatch, tmp_path):
    first = RunFolder(f"{store.scheme}://{bucket}/run")
    write(first.local / "data" / "sft.parquet", "rows")
    write(first.local / "models" / "sft" / "config.json", "{}")
    write(first.local / "models" / "sft" / "model.safetensors", "weights")
    first.publish()
    monkeypatch.setenv(storage.SCRATCH_ENV, str(tmp_path / "fresh"))
    second = RunFolder(f"{store.scheme}://{bucket}/run")
    assert second.local == tmp_path / "fresh" / store.scheme / bucket / "run" and not second.local.exists()
    assert second.fetch(second.local / "models" / "sft")
    assert sorted(p.name for p in (second.local / "models" / "sft").iterdir()) == ["config.json", "model.safetensors"]
    assert second.fetch(second.local / "data" / "sft.parquet")
    assert (second.local / "data" / "sft.parquet").read_text() == "rows"
    assert not second.fetch(second.local / "models" / "rl")  # the bucket has none: nothing there
    assert second.read_text("data/sft.parquet") == "rows" and second.read_text("nothing") is None
    write(second.local / "data" / "sft.parquet", "ROWS")  # a copy at the bucket's size is kept...
    second.fetch(second.local / "data" / "sft.parquet")
    assert (second.local / "data" / "sft.parquet").read_text() == "ROWS"
    second.fetch(second.local / "data" / "sft.parquet", refresh=True)  # ...unless refreshed
    assert (second.local / "data" / "sft.parquet").read_text() == "rows"
    assert not list(second.local.rglob(f"*{storage.FETCHING}"))


def test_materialize_fetches_to_each_node_once_and_again_when_the_bucket_holds_a_newer_copy(bucket, store,
                                                                                              monkeypatch, tmp_path):
    """What an actor on any node does with a location it is given (a model folder, a data file)."""
    writer = RunFolder(f"{store.scheme}://{bucket}/run")  # the node that wrote the export
    weights = write(writer.local / "models" / "sft" / "model.safetensors", "weights v1")
    writer.publish()
    url = f"{store.scheme}://{bucket}/run/models/sft"
    assert storage.materialize(tmp_path / "models" / "given") == tmp_path / "models" / "given"  # a path: itself
    inode = weights.stat().st_ino
    assert storage.materialize(url) == weights.parent and weights.stat().st_ino == inode  # the writer's node: kept
    monkeypatch.setenv(storage.SCRATCH_ENV, str(tmp_path / "node2"))
    copy = storage.materialize(url) / "model.safetensors"
    assert copy == tmp_path / "node2" / store.scheme / bucket / "run" / "models" / "sft" / "model.safetensors"
    assert copy.read_text() == "weights v1"
    fetched = copy.stat().st_ino
    assert storage.materialize(url) / "model.safetensors" == copy and copy.stat().st_ino == fetched  # fetched once
    time.sleep(1.1)  # another run's export at the same place and of the same size: node2's copy is stale
    write(weights, "weights v2")
    writer.publish()
    assert (storage.materialize(url) / "model.safetensors").read_text() == "weights v2"
    with pytest.raises(FileNotFoundError, match=f"{store.scheme}://{bucket}/run/models/rl is not in the bucket"):
        storage.materialize(f"{store.scheme}://{bucket}/run/models/rl")


def test_prepare_drops_a_scratch_copy_of_another_state_and_refreshes_what_a_resume_reads(bucket, store, caplog):
    folder = RunFolder(f"{store.scheme}://{bucket}/run", skip=("state.json",))
    write(folder.local / "state.json", "one")
    write(folder.local / "metrics.jsonl", "bucket's rows\n")
    write(folder.local / "data" / "sft.parquet", "rows")
    folder.publish()
    folder.publish(folder.local / "state.json")
    write(folder.local / "metrics.jsonl", "rows logged after the last publish\n")
    again = RunFolder(f"{store.scheme}://{bucket}/run", skip=("state.json",))  # a rerun on this machine: the copy is kept
    with caplog.at_level(logging.DEBUG, logger=storage.__name__):
        again.prepare("state.json", ["metrics.jsonl"])
        assert (again.local / "metrics.jsonl").read_text() == "bucket's rows\n"  # the bucket is the truth
        assert (again.local / "data" / "sft.parquet").is_file()
        again.publish()
    assert uploads(caplog) == []  # what the bucket holds already is not uploaded again
    write(folder.local / "state.json", "two")  # the scratch copy moved on, its state never reached the bucket
    write(folder.local / "models" / "stale" / "x", "from a run the bucket does not know")
    RunFolder(f"{store.scheme}://{bucket}/run").prepare("state.json", ["metrics.jsonl"])
    assert sorted(p.relative_to(folder.local).as_posix() for p in folder.local.rglob("*") if p.is_file()) == [
        "metrics.jsonl", "state.json"]  # dropped; only what a resume reads first is fetched back
    assert (folder.local / "state.json").read_text() == "one"


def test_move_aside_in_a_bucket_keeps_everything_under_a_new_prefix(bucket, store):
    folder = RunFolder(f"{store.scheme}://{bucket}/run")
    write(folder.local / "state.json", "{}")
    write(folder.local / "models" / "sft" / "w", "w")
    folder.publish()
    aside = folder.move_aside()
    assert aside.startswith(f"{store.scheme}://{bucket}/run-")
    assert store.objects(aside.removeprefix(f"{store.scheme}://")) == {"state.json": 2, "models/sft/w": 1}
    assert store.objects(f"{bucket}/run") == {} and not folder.local.exists()
    assert folder.move_aside() is None  # nothing left to move


def checkpoint_files(folder: Path, step: int, rank: int) -> list[Path]:
    """The files a ZeRO-2 rank writes into a checkpoint folder (what DeepSpeed writes is immaterial here)."""
    files = [write(folder / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", "o" * 10 * step),
             write(folder / f"rng_rank{rank}.pt", "r" * rank)]
    if rank == 0:
        files.append(write(folder / "mp_rank_00_model_states.pt", "m" * 100 * step))
    return files


def test_each_rank_publishes_the_files_naming_it_and_rank_0_those_naming_none(tmp_path):
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng_rank0.pt",
                 "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_rank1.pt",
                 "zero_pp_rank_10_mp_rank_00_model_states.pt"):
        write(tmp_path / name, name)
    assert {rank: [path.name for path in checkpoints.own_files(tmp_path, rank)] for rank in (0, 1, 10)} == {
        0: ["mp_rank_00_model_states.pt", "rng_rank0.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"],
        1: ["bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_rank1.pt"],
        10: ["zero_pp_rank_10_mp_rank_00_model_states.pt"]}


def test_a_checkpoint_counts_once_every_rank_uploaded_then_its_manifest_then_latest(bucket, store, monkeypatch,
                                                                                    tmp_path, caplog):
    """Two ranks on two nodes (two scratch folders): each uploads what it wrote; rank 0 then lists the bucket into
    the manifest (rank 1's files are not on its node), uploads it, then `latest`."""
    url = f"{store.scheme}://{bucket}/run/checkpoints/sft"
    with caplog.at_level(logging.DEBUG, logger=storage.__name__):
        for rank in (1, 0):
            monkeypatch.setenv(storage.SCRATCH_ENV, str(tmp_path / f"node{rank}"))
            folder = RunFolder(url)
            checkpoint_files(folder.local / "step3", 3, rank)
            folder.publish(*checkpoints.own_files(folder.local / "step3", rank))
        assert checkpoints.usable_tag(url) is None  # files alone are no checkpoint
        checkpoints._commit(folder, "step3", 3)
    order = [key.removeprefix(f"{bucket}/run/checkpoints/sft/") for key in uploads(caplog)]
    assert order[-2:] == ["step3/manifest.json", "latest"]
    assert sorted(order[:-2]) == sorted(f"step3/{name}" for name in (
        "zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_rank1.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "rng_rank0.pt", "mp_rank_00_model_states.pt"))
    manifest = json.loads(store.read(f"{bucket}/run/checkpoints/sft/step3/manifest.json"))
    assert manifest == {"step": 3, "files": {name.removeprefix("step3/"): size for name, size in store.objects(
        f"{bucket}/run/checkpoints/sft").items() if name.startswith("step3/") and not name.endswith("manifest.json")}}
    assert len(manifest["files"]) == 5
    assert checkpoints.usable_tag(url) == "step3"


@pytest.mark.parametrize("damage", ["upload cut before the manifest", "an object cut short", "an object missing"])
def test_a_damaged_checkpoint_in_a_bucket_is_passed_over_for_the_previous_one(bucket, store, caplog, damage):
    url = f"{store.scheme}://{bucket}/checkpoints/sft"
    folder = RunFolder(url)
    for step in (3, 6):
        folder.publish(*checkpoint_files(folder.local / f"step{step}", step, 0))
        if step == 3 or damage != "upload cut before the manifest":
            checkpoints._commit(folder, f"step{step}", step)
    fs = store.filesystem()
    model = f"{bucket}/checkpoints/sft/step6/mp_rank_00_model_states.pt"
    if damage == "upload cut before the manifest":  # and the pointer moved anyway: the worst order
        with fs.open_output_stream(f"{bucket}/checkpoints/sft/latest") as out:
            out.write(b"step6")
    if damage == "an object cut short":
        with fs.open_output_stream(model) as out:
            out.write(b"m" * 250)
    if damage == "an object missing":
        fs.delete_file(model)
    with caplog.at_level(logging.WARNING, logger=checkpoints.__name__):
        assert checkpoints.usable_tag(url) == "step3"
    warnings = " ".join(record.getMessage() for record in caplog.records)
    assert f"checkpoint step6 in {url} is unusable" in warnings
    assert "resuming from the earlier checkpoint step3" in warnings


def test_bad_buckets_are_named_in_one_line_without_credentials(s3_env, monkeypatch):
    bucket = s3_env.create_bucket("bad-buckets")
    assert RunFolder(f"s3://{bucket}/run").problem() is None
    problems = {"missing": RunFolder("s3://no-such-bucket/run").problem()}
    s3_env.filesystem().open_output_stream(f"{bucket}/a-file").close()
    problems["file"] = RunFolder(f"s3://{bucket}/a-file").problem()
    with moto_server(refuse_everyone=True) as locked:
        monkeypatch.setenv("AWS_ENDPOINT_URL", locked.endpoint)
        problems["refused"] = RunFolder(f"s3://{bucket}/run").problem()
        with pytest.raises(StorageError) as refused:
            RunFolder(f"s3://{bucket}/run").read_text("state.json")
        with pytest.raises(StorageError) as on_a_node:  # an actor's fetch, on a node without the credentials
            storage.materialize(f"s3://{bucket}/run/models/student")
    monkeypatch.setenv("AWS_ENDPOINT_URL", locked.endpoint)  # stopped: nothing listens there now
    problems["unreachable"] = RunFolder(f"s3://{bucket}/run").problem()
    assert problems["missing"].startswith("the bucket no-such-bucket does not exist")
    assert problems["file"].startswith("a file is in the way")
    assert problems["refused"].startswith("access refused: check the credentials")
    assert str(refused.value).startswith(f"reading s3://{bucket}/run/state.json: access refused")
    assert problems["unreachable"] == f"the store cannot be reached at {locked.endpoint}: check AWS_ENDPOINT_URL " \
                                      "and the network"
    assert str(on_a_node.value) == (f"looking for s3://{bucket}/run/models/student: access refused: check the "
                                    "credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile or the node's "
                                    f"role) and that they may read and write there (on {socket.gethostname()}: every "
                                    "node needs the store's endpoint and credentials in its own environment)")
    assert str(pickle.loads(pickle.dumps(on_a_node.value))) == str(on_a_node.value)  # as Ray hands it to the driver
    for text in [*problems.values(), str(refused.value), str(on_a_node.value)]:
        assert "\n" not in text and SECRET_ACCESS_KEY not in text and ACCESS_KEY_ID not in text


def test_a_url_holding_credentials_is_refused_without_repeating_them():
    with pytest.raises(ValueError) as refused:
        RunFolder(f"s3://{ACCESS_KEY_ID}:{SECRET_ACCESS_KEY}@runs/smoke")
    assert str(refused.value).startswith("run folder s3://runs/smoke: the URL holds credentials")
    assert SECRET_ACCESS_KEY not in str(refused.value) and ACCESS_KEY_ID not in str(refused.value)


GCS_NO_TOKEN = ("google::cloud::Status(UNAVAILABLE: Retry policy exhausted, with a last message of Could not create a "
                "OAuth2 access token to authenticate the request.")


@pytest.mark.parametrize("scheme, said, meant", [
    ("s3", "AWS Error ACCESS_DENIED during HeadObject operation: No response body.", "access refused: check the "
     "credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile or the node's role)"),
    ("gs", GCS_NO_TOKEN, "access refused: check the credentials (GOOGLE_APPLICATION_CREDENTIALS or the node's"),
    ("gs", "google::cloud::Status(PERMISSION_DENIED: Permission denied on bucket)", "access refused"),
    ("gs", "google::cloud::Status(UNAVAILABLE: Retry policy exhausted: connection refused)",
     "the store cannot be reached: check the network"),
    ("s3", f"AWS Error UNKNOWN during PutObject: signature for {SECRET_ACCESS_KEY} rejected\nmore",
     "AWS Error UNKNOWN during PutObject: signature for *** rejected"),  # the store's own words, one line, redacted
])
def test_what_the_store_says_becomes_one_line_a_user_acts_on(monkeypatch, scheme, said, meant):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
    described = storage.describe_failure(OSError(said), scheme)
    assert described.startswith(meant) and "\n" not in described and SECRET_ACCESS_KEY not in described
