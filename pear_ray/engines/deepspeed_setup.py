"""Building one DeepSpeed rank: the process group, the model, torch AdamW and the LR schedule.

A rank sets its own rendezvous variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and joins the
process group (gloo on CPU, nccl on GPU), so no launcher is involved. DeepSpeed's own batch bookkeeping
(train_batch_size, micro batch, gradient accumulation) is set to 1 row x 1 accumulation step x world size and never
consulted: every `engine.step()` is one optimizer update on whatever rows the rank was given (the learner divides
each loss by the global batch's size itself, see deepspeed_learner.py), after one backward or, under a token
budget, several, the learner marking the last as the accumulation boundary.
"""

from __future__ import annotations

import logging
import os
import random
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from pear_ray.engines import lora as adapters

if TYPE_CHECKING:
    from pear_ray.config import LoraConfig

LR_SCHEDULES = ("constant", "cosine", "linear")
# Our names (config/optimizer.py) -> transformers.get_scheduler names; all three warm up linearly over warmup_steps.
_HF_SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}


def prepare_deepspeed(use_gpu: bool):
    """Import DeepSpeed for this process: CPU accelerator unless a GPU is used, no shm comm-op JIT build."""
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read once, when DeepSpeed first picks its accelerator
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    # The shm op is only a faster intra-node allreduce for CPU; building it costs ~25 s of g++.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if ds_logger.level < logging.WARNING:
        ds_logger.setLevel(logging.WARNING)
    # DeepSpeed 0.19.8's ZeRO calls torch.distributed.all_gather_into_tensor / reduce_scatter_tensor, which torch
    # 2.13 deprecates with a FutureWarning on every step.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    return deepspeed


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def join_process_group(deepspeed, *, rank: int, world_size: int, local_rank: int, master_addr: str,
                       master_port: int, use_gpu: bool) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank),
                      MASTER_ADDR=str(master_addr), MASTER_PORT=str(master_port))
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo", auto_mpi_discovery=False, verbose=False)


def build_engine(deepspeed, model_dir: Path, *, world_size: int, zero_stage: int, lr: float, weight_decay: float,
                 grad_clip: float, warmup_steps: int, total_steps: int | None, lr_schedule: str, bf16: bool,
                 betas: tuple[float, float], eps: float, lora: LoraConfig | None = None):
    """(DeepSpeed engine, LR scheduler, pad id) for the model folder, loaded in fp32 (bf16 training keeps fp32
    master weights). torch AdamW: DeepSpeed's fused/CPU Adam would JIT-compile for ~40 s on CPU. With `lora` the
    model gets adapters first and the optimizer holds only them."""
    from transformers import AutoModelForCausalLM, get_scheduler

    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
    if lr_schedule != "constant" and not total_steps:
        raise ValueError(f"lr_schedule {lr_schedule!r} decays to 0 at total_steps: give total_steps > 0")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    pad_id = int(model.config.pad_token_id if model.config.pad_token_id is not None else 0)
    if lora is not None:
        model = adapters.with_adapters(model, lora)
    trained = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def make_scheduler(opt):
        return get_scheduler(_HF_SCHEDULES[lr_schedule], opt, num_warmup_steps=warmup_steps,
                             num_training_steps=total_steps)

    config = {
        "train_batch_size": world_size,  # bookkeeping only, see the module docstring
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": float(grad_clip),
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,  # torch AdamW under ZeRO
        "bf16": {"enabled": bool(bf16)},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    # The scheduler is built by DeepSpeed from the optimizer it wraps, so engine.step() advances it and
    # save/load_checkpoint include it.
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=make_scheduler,
                                                   config=config)
    # No model dropout, ever: the training forward, logp_old and logprobs() must all be the same distribution (and
    # from_pretrained already returns the model in eval mode). Dropout-free RL is the usual choice for LLMs. Only
    # LoRA's own dropout, when asked for, is switched on in training forwards (the learner's step).
    engine.module.eval()
    return engine, scheduler, pad_id
