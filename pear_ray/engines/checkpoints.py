"""Learner checkpoints: DeepSpeed's (module, optimizer, LR scheduler) plus our update counter, the caller's client
state and every rank's RNG states, so a resumed run continues exactly where it stopped."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)
_STATE_KEY = "pear_ray"  # our entry in DeepSpeed's client_state


def save(learner, ckpt_dir: str | Path, client_state: dict | None = None, tag: str | None = None) -> str:
    """Checkpoint under ckpt_dir/tag (default `step<N>`, N the optimizer updates so far), RNG states in
    rng_rank<r>.pt. ckpt_dir must be one folder every rank can write (a shared filesystem on a cluster). Returns
    the tag."""
    tag = tag or f"step{learner.optimizer_steps}"
    state = {_STATE_KEY: {"step": learner.optimizer_steps, "client_state": dict(client_state or {})}}
    learner.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=state)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    rng_dir = Path(ckpt_dir) / tag  # DeepSpeed creates it only on the ranks that write model/optimizer files
    rng_dir.mkdir(parents=True, exist_ok=True)
    torch.save(rng, rng_dir / f"rng_rank{learner.rank}.pt")
    return tag


def load(learner, ckpt_dir: str | Path, tag: str | None = None) -> dict:
    """Restore what `save` wrote (tag defaults to the latest); returns the caller's client_state."""
    ckpt_dir = Path(ckpt_dir)
    if tag is None:
        latest = ckpt_dir / "latest"
        if not latest.is_file():
            raise FileNotFoundError(f"no checkpoint in {ckpt_dir} (no 'latest' file)")
        tag = latest.read_text().strip()
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
