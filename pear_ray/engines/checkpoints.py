"""Learner checkpoints: DeepSpeed's (module, optimizer, LR scheduler) plus our update counter, the caller's client
state and every rank's RNG states, so a resumed run continues exactly where it stopped. Under LoRA the module's
state is the adapters alone (the frozen weights are the start model's, which the learner loads anyway).

Never half-used: every rank writes its files into ckpt_dir/<tag>; then rank 0 records each file's size in
<tag>/manifest.json and, last, points ckpt_dir/latest at the tag (each by an atomic rename). A resume takes the
checkpoint `latest` names when its files match its manifest, else the newest one that does, with a warning. A write
that fails (a full disk) removes its partial folder and leaves `latest` where it was.

ckpt_dir may be a URL (a run folder on object storage, pear_ray/storage.py): each rank then writes its files to its
node's scratch copy and uploads them itself; after all ranks' uploads (the barrier they meet at), rank 0 lists what
the bucket holds into the manifest, uploads it, then `latest`. So the rule is the same: files, manifest, pointer, and
an upload cut before its manifest is passed over like a truncated checkpoint. A resume reads the manifests and sizes
in the bucket, and each rank fetches the checkpoint it loads into its node's copy.
"""

from __future__ import annotations

import errno
import json
import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from pear_ray import atomic, faults
from pear_ray.storage import RunFolder

log = logging.getLogger(__name__)
_STATE_KEY = "pear_ray"  # our entry in DeepSpeed's client_state
MANIFEST = "manifest.json"
LATEST = "latest"  # DeepSpeed's name for the pointer file, so its own tools (zero_to_fp32.py) read ours


def save(learner, ckpt_dir: str | Path, client_state: dict | None = None, tag: str | None = None) -> str:
    """Checkpoint under ckpt_dir/tag (default `step<N>`, N the optimizer updates so far), RNG states in
    rng_rank<r>.pt. ckpt_dir is a folder every rank can write (a shared filesystem on a cluster) or a URL. Returns
    the tag; raises OSError saying what is left to resume from when the checkpoint could not be written."""
    store = RunFolder(ckpt_dir)
    tag = tag or f"step{learner.optimizer_steps}"
    folder = store.local / tag
    store.remove(f"{tag}/{MANIFEST}")  # a folder being (re)written is no checkpoint until committed
    state = {_STATE_KEY: {"step": learner.optimizer_steps, "client_state": dict(client_state or {})}}
    try:
        learner.engine.save_checkpoint(str(store.local), tag=tag, client_state=state, save_latest=False,
                                       exclude_frozen_parameters=learner.lora is not None)
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        folder.mkdir(parents=True, exist_ok=True)  # DeepSpeed creates it only on ranks that write model files
        torch.save(rng, folder / f"rng_rank{learner.rank}.pt")
        store.publish(*own_files(folder, learner.rank))
        learner.deepspeed.comm.barrier()  # every rank's files are written (and uploaded)
        faults.kill_point(f"checkpoint-write/{store.local.name}")
        if learner.rank == 0:
            _commit(store, tag, learner.optimizer_steps)
    except (OSError, RuntimeError) as error:  # torch.save reports a file it cannot open or write as RuntimeError
        previous = _pointer(store)
        if learner.rank == 0 and tag != previous:
            shutil.rmtree(folder, ignore_errors=True)  # frees what the failed write took
        left = (f"the previous checkpoint {previous} is intact; a rerun resumes from it" if previous
                else "there is no earlier checkpoint; a rerun starts this training again")
        raise OSError(getattr(error, "errno", None) or errno.EIO,
                      f"checkpoint {tag} could not be written to {store.location} ({error}); {left}") from error
    return tag


def own_files(folder: Path, rank: int) -> list[Path]:
    """The files of a checkpoint folder that learner rank `rank` wrote, and uploads: those naming it (DeepSpeed's
    `*pp_rank_<r>_*`, our `rng_rank<r>.pt`), and for rank 0 those naming no rank (the model states of ZeRO 0-2)."""
    owned = []
    for file in sorted(folder.iterdir()):
        named = re.search(r"(?:pp_rank_|rng_rank)(\d+)", file.name)
        if file.is_file() and (int(named.group(1)) if named else 0) == rank:
            owned.append(file)
    return owned


def _commit(ckpt_dir: str | Path | RunFolder, tag: str, step: int) -> None:
    """Make ckpt_dir/tag the checkpoint to resume from: its files on disk (or in the bucket), their sizes in its
    manifest, then the pointer."""
    store = ckpt_dir if isinstance(ckpt_dir, RunFolder) else RunFolder(ckpt_dir)
    folder = store.local / tag
    if store.remote is None:
        atomic.sync_tree(folder)
    files = {name: size for name, size in store.sizes(tag).items() if name != MANIFEST}
    atomic.write_text(folder / MANIFEST, json.dumps({"step": step, "files": files}, indent=1))
    store.publish(folder / MANIFEST)
    atomic.write_text(store.local / LATEST, tag)
    store.publish(store.local / LATEST)


def _pointer(store: RunFolder) -> str | None:
    latest = store.read_text(LATEST)
    return latest.strip() if latest is not None else None


def _problem(manifest: str | None, sizes: dict[str, int]) -> str | None:
    """Why a checkpoint cannot be used, given its manifest and the sizes of the files its folder holds; None when
    every file the manifest lists is there, whole."""
    if manifest is None:
        return "it has no manifest: its writing never finished"
    for name, size in json.loads(manifest)["files"].items():
        if name not in sizes:
            return f"{name} is missing"
        if sizes[name] != size:
            return f"{name} has {sizes[name]} bytes, its manifest says {size}"
    return None


def usable_tag(ckpt_dir: str | Path | RunFolder) -> str | None:
    """The checkpoint to resume from: the one `latest` names when it is whole, else the newest whole one (with a
    warning); None when there is none (training starts afresh). Read where ckpt_dir lives (the bucket for a URL)."""
    store = ckpt_dir if isinstance(ckpt_dir, RunFolder) else RunFolder(ckpt_dir)
    pointer = _pointer(store)
    sizes: dict[str, dict[str, int]] = {}  # tag -> file -> size
    for name, size in store.sizes().items():
        tag, _, file = name.partition("/")
        if file:
            sizes.setdefault(tag, {})[file] = size
    manifests = {tag: store.read_text(f"{tag}/{MANIFEST}") for tag, files in sizes.items() if MANIFEST in files}
    committed = sorted(manifests, key=lambda tag: json.loads(manifests[tag])["step"], reverse=True)
    candidates = ([pointer] if pointer else []) + [tag for tag in committed if tag != pointer]
    for tag in candidates:
        problem = _problem(manifests.get(tag), sizes.get(tag, {}))
        if problem is None:
            if tag != pointer:
                log.warning("resuming from the earlier checkpoint %s in %s", tag, store.location)
            return tag
        log.warning("checkpoint %s in %s is unusable: %s", tag, store.location, problem)
    return None


def load(learner, ckpt_dir: str | Path, tag: str | None = None) -> dict:
    """Restore what `save` wrote (tag defaults to `usable_tag`'s pick); returns the caller's client_state. From a
    URL, the rank first fetches the checkpoint into its node's copy (files already there whole are kept)."""
    store = RunFolder(ckpt_dir)
    tag = tag or usable_tag(store)
    if tag is None:
        raise FileNotFoundError(f"no complete checkpoint in {store.location}")
    store.fetch(store.local / tag)
    path, state = learner.engine.load_checkpoint(str(store.local), tag=tag, load_optimizer_states=True,
                                                 load_lr_scheduler_states=True,
                                                 load_module_strict=learner.lora is None)  # LoRA: adapters only
    if path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint {tag!r} in {store.location}")
    ours = (state or {}).get(_STATE_KEY)
    if ours is None:
        raise ValueError(f"{store.location}/{tag} was not written by pear_ray's learner")
    learner.optimizer_steps = int(ours["step"])
    rng_file = store.local / tag / f"rng_rank{learner.rank}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    else:
        log.warning("no RNG state for rank %d in %s/%s (saved with fewer ranks?); RNG not restored", learner.rank,
                    store.location, tag)
    return dict(ours["client_state"])
