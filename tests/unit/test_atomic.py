"""Files, folders and checkpoints are never seen half-written: writes go to a temporary name and move into place
whole, and a checkpoint whose files do not match its manifest is passed over for the one before it."""

import errno
import logging
from pathlib import Path

import pytest

from pear_ray import atomic
from pear_ray.engines import checkpoints


def test_a_failed_write_leaves_the_old_file_and_no_partial(tmp_path):
    path = tmp_path / "state.json"
    atomic.write_text(path, "old")
    with pytest.raises(OSError, match="No space left"):
        with atomic.replacing(path) as partial:
            partial.write_text("half of the ne")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert path.read_text() == "old"
    assert list(tmp_path.iterdir()) == [path]


def test_a_folder_is_replaced_whole(tmp_path):
    out = tmp_path / "models" / "sft"
    for version in ("one", "two"):
        with atomic.replacing(out) as partial:
            partial.mkdir()
            (partial / version).write_text(version)
            assert not out.joinpath(version).exists()  # nothing shows before it is complete
    assert [p.name for p in out.iterdir()] == ["two"]
    (out.parent / "sft.partial").mkdir()  # left by a writer that was killed
    with atomic.replacing(out) as partial:
        partial.mkdir()
    assert sorted(p.name for p in out.parent.iterdir()) == ["sft"]


def fake_checkpoint(ckpt_dir: Path, step: int, *, commit: bool = True) -> Path:
    """A checkpoint folder as `checkpoints.save` leaves it (what DeepSpeed writes is immaterial here)."""
    folder = ckpt_dir / f"step{step}"
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"m" * 100 * step)
    (folder / "rng_rank0.pt").write_bytes(b"r" * 10)
    if commit:
        checkpoints._commit(ckpt_dir, folder.name, step)
    return folder


@pytest.mark.parametrize("damage", ["truncated", "missing", "never committed"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one_with_a_warning(tmp_path, caplog, damage):
    fake_checkpoint(tmp_path, 3)
    newest = fake_checkpoint(tmp_path, 6, commit=damage != "never committed")
    if damage == "never committed":  # killed after its files, before its manifest; the pointer still moved
        (tmp_path / checkpoints.LATEST).write_text(newest.name)
    model = newest / "mp_rank_00_model_states.pt"
    if damage == "truncated":
        model.write_bytes(model.read_bytes()[:250])
    if damage == "missing":
        model.unlink()
    with caplog.at_level(logging.WARNING, logger=checkpoints.__name__):
        assert checkpoints.usable_tag(tmp_path) == "step3"
    warnings = " ".join(record.getMessage() for record in caplog.records)
    assert "step6" in warnings and "unusable" in warnings and "resuming from the earlier checkpoint step3" in warnings


def test_a_whole_checkpoint_is_used_silently_and_none_means_start_afresh(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger=checkpoints.__name__):
        assert checkpoints.usable_tag(tmp_path / "none yet") is None
        fake_checkpoint(tmp_path, 3)
        fake_checkpoint(tmp_path, 6)
        assert checkpoints.usable_tag(tmp_path) == "step6"
    assert not caplog.records
    (tmp_path / "step3" / "rng_rank0.pt").unlink()
    (tmp_path / "step6" / "rng_rank0.pt").unlink()
    assert checkpoints.usable_tag(tmp_path) is None
