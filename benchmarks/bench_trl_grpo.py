"""TRL's GRPOTrainer on the same tiny model and task as benchmarks/bench_rl.py (prints figures; not a test).

TRL is not a dependency of the project: the first run makes a scratch venv (--venv, default /tmp/trl-venv) that
sees this environment's packages through a .pth file, pip-installs trl (--trl) into it, and re-runs itself there.

Same as bench_rl.py: the default tiny Qwen2 (fp32), the same --prompts basic_arithmetic train prompts (pear_ray's
task, prompts as text through the tokenizer's chat template, which is how pear_ray encodes them), the
reasoning-gym scorer as the reward, --prompts-per-step prompts x --group-size generations per step, at most
--max-tokens new tokens, temperature 1, one update per generation batch (num_iterations 1, steps_per_generation
1), clip 0.2/0.28, loss_type dapo (token-mean over the batch), beta 0 (no KL, no reference model), lr 1e-5.
TRL's side: one process, generation with transformers' generate (no vLLM), on CPU with --threads torch threads
(pear_ray's side: one rollout actor and one learner, 0.5 Ray CPU and one torch thread each, on the same 2 cores).
Figures: median seconds between optimizer steps after --warmup; samples/s = prompts x group size / that.

Run: .venv/bin/python benchmarks/bench_trl_grpo.py [--help]
"""

from __future__ import annotations

import argparse
import os
import site
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine_load import MachineLoad, add_grpo_workload, other_load  # benchmarks/ is on sys.path when run


def ensure_trl(venv: Path, version: str) -> None:
    """Re-run this script in a venv with TRL, made on first use."""
    try:
        import trl  # noqa: F401
        return
    except ImportError:
        pass
    python = venv / "bin" / "python"
    if not python.exists():
        base = Path(sys.base_prefix) / "bin" / "python3"
        subprocess.run([str(base), "-m", "venv", str(venv)], check=True)
        packages = next(Path(p) for p in site.getsitepackages() if p.endswith("site-packages"))
        target = next((venv / "lib").glob("python3*/site-packages"))
        # addsitedir, not a bare path: the .pth files there (the editable install of pear_ray) must run too
        (target / "our_venv.pth").write_text(f"import site; site.addsitedir({str(packages)!r})\n")
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"trl=={version}"], check=True)
    os.execv(str(python), [str(python), *sys.argv])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_grpo_workload(parser)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of TRL's one process")
    parser.add_argument("--venv", type=Path, default=Path("/tmp/trl-venv"))
    parser.add_argument("--trl", default="1.16.0")
    args = parser.parse_args()
    ensure_trl(args.venv, args.trl)

    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from pear_ray.config import TaskConfig
    from pear_ray.data import schema
    from pear_ray.models import TinyModelSpec, build_tiny_model
    from pear_ray.tasks import make_task

    torch.set_num_threads(args.threads)
    task = make_task(TaskConfig(kind="reasoning_gym", name="basic_arithmetic", num_train=args.prompts, num_eval=2,
                                args={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}))
    prompts = task.prompts("train")
    data = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": text}] for text in prompts.column(schema.PROMPT).to_pylist()],
        "answer": [str(a) for a in prompts.column(schema.ANSWER).to_pylist()],
        "metadata": prompts.column(schema.METADATA).to_pylist() if schema.METADATA in prompts.column_names
        else [None] * prompts.num_rows,
    })

    def reward(completions, answer, metadata, **_) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float(task.score(text, a, m)) for text, a, m in zip(texts, answer, metadata)]

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter())

    load_before = other_load()
    machine = MachineLoad()
    machine.start()
    with tempfile.TemporaryDirectory() as folder:
        model_dir = build_tiny_model(TinyModelSpec(), Path(folder) / "model")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        batch = args.prompts_per_step * args.group_size
        config = GRPOConfig(
            output_dir=str(Path(folder) / "out"), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
            max_steps=args.warmup + args.steps, logging_steps=1, learning_rate=1e-5, seed=0,
            per_device_train_batch_size=batch, gradient_accumulation_steps=1, steps_per_generation=1,
            num_generations=args.group_size, max_completion_length=args.max_tokens, temperature=1.0,
            num_iterations=1, epsilon=0.2, epsilon_high=0.28, loss_type="dapo", beta=0.0, use_vllm=False,
            dataloader_num_workers=0, disable_tqdm=True,
        )
        times = StepTimes()
        trainer = GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=reward, args=config,
                              train_dataset=data, callbacks=[times])
        started = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - started
    steps = [b - a for a, b in zip(times.times[args.warmup - 1:], times.times[args.warmup:])]
    step_s = statistics.median(steps)
    print(f"\nTRL {trl.__version__} GRPOTrainer, tiny Qwen2 {TinyModelSpec()}: basic_arithmetic, "
          f"{args.prompts_per_step} prompts x {args.group_size} generations, <= {args.max_tokens} tokens, "
          f"temperature 1, 1 update per generation batch, clip 0.2/0.28, loss_type dapo, beta 0, transformers "
          f"generate, CPU, {args.threads} torch threads, one process")
    print(f"median step {step_s:.3f} s over {len(steps)} steps after {args.warmup} warm-up: "
          f"{batch / step_s:.1f} samples/s (run {wall:.0f} s)")
    print(machine.stop())
    print(f"machine before: {load_before}\nmachine after:  {other_load()}")


if __name__ == "__main__":
    main()
