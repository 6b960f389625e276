"""Learner checkpoints: DeepSpeed's (module, optimizer, LR scheduler) plus our update counter, the caller's client
state and every rank's RNG states, so a resumed run continues exactly where it stopped.

Never half-used: every rank writes its files into ckpt_dir/<tag>; then rank 0 flushes them to disk, records each
file's size in <tag>/manifest.json and, last, points ckpt_dir/latest at the tag (each by an atomic rename). A resume
takes the checkpoint `latest` names when its files match its manifest, else the newest one that does, with a
warning. A write that fails (a full disk) removes its partial folder and leaves `latest` where it was.
"""

from __future__ import annotations

import errno
import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from pear_ray import atomic, faults

log = logging.getLogger(__name__)
_STATE_KEY = "pear_ray"  # our entry in DeepSpeed's client_state
MANIFEST = "manifest.json"
LATEST = "latest"  # DeepSpeed's name for the pointer file, so its own tools (zero_to_fp32.py) read ours


def save(learner, ckpt_dir: str | Path, client_state: dict | None = None, tag: str | None = None) -> str:
    """Checkpoint under ckpt_dir/tag (default `step<N>`, N the optimizer updates so far), RNG states in
    rng_rank<r>.pt. ckpt_dir must be one folder every rank can write (a shared filesystem on a cluster). Returns
    the tag; raises OSError saying what is left to resume from when the checkpoint could not be written."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag or f"step{learner.optimizer_steps}"
    folder = ckpt_dir / tag
    (folder / MANIFEST).unlink(missing_ok=True)  # a folder being (re)written is no checkpoint until committed
    state = {_STATE_KEY: {"step": learner.optimizer_steps, "client_state": dict(client_state or {})}}
    try:
        learner.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=state, save_latest=False)
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        folder.mkdir(parents=True, exist_ok=True)  # DeepSpeed creates it only on ranks that write model files
        torch.save(rng, folder / f"rng_rank{learner.rank}.pt")
        learner.deepspeed.comm.barrier()  # every rank's files are written
        faults.kill_point(f"checkpoint-write/{ckpt_dir.name}")
        if learner.rank == 0:
            _commit(ckpt_dir, tag, learner.optimizer_steps)
    except (OSError, RuntimeError) as error:  # torch.save reports a file it cannot open or write as RuntimeError
        previous = _pointer(ckpt_dir)
        if learner.rank == 0 and tag != previous:
            shutil.rmtree(folder, ignore_errors=True)  # frees what the failed write took
        left = (f"the previous checkpoint {previous} is intact; a rerun resumes from it" if previous
                else "there is no earlier checkpoint; a rerun starts this training again")
        raise OSError(getattr(error, "errno", None) or errno.EIO,
                      f"checkpoint {tag} could not be written to {ckpt_dir} ({error}); {left}") from error
    return tag


def _commit(ckpt_dir: Path, tag: str, step: int) -> None:
    """Make ckpt_dir/tag the checkpoint to resume from: its files on disk, their sizes in its manifest, then the
    pointer."""
    folder = ckpt_dir / tag
    atomic.sync_tree(folder)
    files = {str(path.relative_to(folder)): path.stat().st_size
             for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST}
    atomic.write_text(folder / MANIFEST, json.dumps({"step": step, "files": files}, indent=1))
    atomic.write_text(ckpt_dir / LATEST, tag)


def _pointer(ckpt_dir: Path) -> str | None:
    latest = ckpt_dir / LATEST
    return latest.read_text().strip() if latest.is_file() else None


def _problem(folder: Path) -> str | None:
    """Why the checkpoint in `folder` cannot be used; None when every file its manifest lists is there, whole."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "it has no manifest: its writing never finished"
    for name, size in json.loads(manifest.read_text())["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, its manifest says {size}"
    return None


def usable_tag(ckpt_dir: str | Path) -> str | None:
    """The checkpoint to resume from: the one `latest` names when it is whole, else the newest whole one (with a
    warning); None when there is none (training starts afresh)."""
    ckpt_dir = Path(ckpt_dir)
    pointer = _pointer(ckpt_dir)
    committed = sorted(ckpt_dir.glob(f"*/{MANIFEST}"), key=lambda path: json.loads(path.read_text())["step"],
                       reverse=True)
    candidates = ([pointer] if pointer else []) + [path.parent.name for path in committed
                                                   if path.parent.name != pointer]
    for tag in candidates:
        problem = _problem(ckpt_dir / tag)
        if problem is None:
            if tag != pointer:
                log.warning("resuming from the earlier checkpoint %s in %s", tag, ckpt_dir)
            return tag
        log.warning("checkpoint %s in %s is unusable: %s", tag, ckpt_dir, problem)
    return None


def load(learner, ckpt_dir: str | Path, tag: str | None = None) -> dict:
    """Restore what `save` wrote (tag defaults to `usable_tag`'s pick); returns the caller's client_state."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag or usable_tag(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"no complete checkpoint in {ckpt_dir}")
    path, state = learner.engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint {tag!r} in {ckpt_dir}")
    ours = (state or {}).get(_STATE_KEY)
    if ours is None:
        raise ValueError(f"{ckpt_dir}/{tag} was not written by pear_ray's learner")
    learner.optimizer_steps = int(ours["step"])
    rng_file = ckpt_dir / tag / f"rng_rank{learner.rank}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    else:
        log.warning("no RNG state for rank %d in %s (saved with fewer ranks?); RNG not restored", learner.rank,
                    ckpt_dir / tag)
    return dict(ours["client_state"])
