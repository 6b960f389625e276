"""TRL's GRPOTrainer on the workload of benchmarks/bench_rl.py, as two harnesses measure it, and what makes their
figures differ (prints figures; not a test).

TRL is not a dependency of the project: the first run makes a scratch venv (--venv, default /tmp/trl-venv) that
sees this environment's packages through a .pth file, pip-installs trl (--trl) into it, and re-runs itself there.

The workload, as bench_rl.py runs it: the default tiny Qwen2 (fp32), pear_ray's own train prompts of the job
bench_rl.py runs (basic_arithmetic; the prompt ids TRL generates from are checked to be pear_ray's), --prompts-per-step
prompts x --group-size generations per step, at most --max-tokens new tokens, temperature 1, one update per
generation batch, clip 0.2/0.28, loss_type dapo (token-mean over the batch), beta 0 (no KL, no reference model), lr
1e-5, transformers' generate (no vLLM), one process on CPU with --threads torch threads.

Two harnesses (`Harness`), each as its author wrote it:
- project: this repository's, from before the peer's figures: metrics logged every step, no progress bar, the reward
  pear_ray computes (the response ids decoded with skip_special_tokens, pear_ray's verifier: `task.score`, which
  goes through reasoning-gym), samples/s = samples per step / the median of the seconds between steps after --warmup.
- peer: as an independent person writes it: GRPOConfig's defaults for everything but the workload (logging every 10
  steps, tqdm bar), a one-line exact-match rule as the reward (equal in value to pear_ray's on these prompts: checked
  on every completion), samples/s = samples of the timed steps / their wall-clock seconds.
Every run records both timings, so each harness's figure is shown by both methods. After the timed runs, the
project harness's rewards are checked against pear_ray's own `decoded_rewards` (its Ray verifier tasks) on the
completions of its last run, and the peer's rule against that reward on the same completions.

--vary reconciles them: the project harness with one of its differences from the peer's changed at a time (plus
gradient checkpointing off, TRL's default being on), all in alternating rounds in this process.

Run: .venv/bin/python benchmarks/bench_trl_grpo.py [--vary] [--help]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import re
import site
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_rl import LEARNING_RATE, PROJECT_PYTHON_ENV, job_tree  # benchmarks/ is on sys.path when run
from machine_load import MachineLoad, add_grpo_workload, measured, other_load


def ensure_trl(venv: Path, version: str) -> None:
    """Re-run this script in a venv with TRL, made on first use (the project's interpreter noted for the re-run)."""
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
    os.environ.setdefault(PROJECT_PYTHON_ENV, sys.executable)
    os.execv(str(python), [str(python), *sys.argv])


@dataclasses.dataclass(frozen=True)
class Harness:
    """How a TRL benchmark of the workload is written: what its author chose beyond the workload."""

    name: str
    logging_steps: int | None  # None: GRPOConfig's default (10)
    progress_bar: bool  # tqdm's bar (the default) or the trainer's printed log lines
    reward: str  # "pear_ray": pear_ray's decode and verifier; "rule": a one-line exact-match rule
    timing: str  # "median": samples / median seconds between steps; "wall": samples / wall-clock seconds
    gradient_checkpointing: bool | None = None  # None: TRL's default (on)
    bf16: bool = False  # the workload is fp32; TRL's default is bf16 autocast, on CPU too

    def config(self) -> dict:
        """GRPOConfig keys this harness sets beyond the workload's."""
        keys = {"bf16": self.bf16} | ({} if self.logging_steps is None else {"logging_steps": self.logging_steps})
        keys |= {} if self.progress_bar else {"disable_tqdm": True}
        return keys | ({} if self.gradient_checkpointing is None else
                       {"gradient_checkpointing": self.gradient_checkpointing})


PROJECT = Harness("project", logging_steps=1, progress_bar=False, reward="pear_ray", timing="median")
PEER = Harness("peer", logging_steps=None, progress_bar=True, reward="rule", timing="wall")


def reconciliation() -> dict[str, Harness]:
    """The two harnesses, and the project's with one thing changed at a time: each of its differences from the
    peer's (the timing method needs no run of its own: every run is timed both ways); gradient checkpointing off
    (both leave TRL's default, on; pear_ray's learner has none); bf16 autocast, TRL's default, which a harness that
    does not set bf16=False gets."""
    variants = {"project": PROJECT, "peer": PEER}
    for knob in ("logging_steps", "progress_bar", "reward"):
        changed = dataclasses.replace(PROJECT, **{knob: getattr(PEER, knob)})
        variants[f"project, peer's {knob}"] = dataclasses.replace(changed, name=f"project, peer's {knob}")
    variants["project, no grad checkpointing"] = dataclasses.replace(
        PROJECT, name="project, no grad checkpointing", gradient_checkpointing=False)
    variants["project, bf16 (TRL's default)"] = dataclasses.replace(PROJECT, name="project, bf16", bf16=True)
    return variants


NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d+)?|\.\d+)")  # `.3` is a number too, as pear_ray reads numbers


def exact_match(completions, answer, **_) -> list[float]:
    """The peer's rule: 1 when the last number on the completion's last non-empty line is the answer."""
    lines = [[line for line in c[-1]["content"].splitlines() if line.strip()] for c in completions]
    return [float(bool(ls) and NUMBER.findall(ls[-1])[-1:] == [a]) for ls, a in zip(lines, answer)]


class Workload:
    """What every TRL run shares: the model, pear_ray's prompts of the job bench_rl.py runs, as TRL's dataset."""

    def __init__(self, args, folder: Path, model_dir: Path):
        from datasets import Dataset

        from pear_ray.config import parse_job
        from pear_ray.data import schema
        from pear_ray.stages.common import Run, prompt_table

        self.args, self.folder, self.model_dir = args, folder, model_dir
        self.job = parse_job(job_tree(str(self.model_dir), args))
        run = Run(self.job, folder / "pear_ray", None, self.model_dir)
        self.task, self.tokenizer = run.task, run.tokenizer
        prompts = prompt_table(run, "train")
        self.prompt_ids = {tuple(ids) for ids in prompts.column(schema.PROMPT_IDS).to_pylist()}
        self.dataset = Dataset.from_dict({
            "prompt": [[{"role": "user", "content": text}] for text in prompts.column(schema.PROMPT).to_pylist()],
            "answer": prompts.column(schema.ANSWER).to_pylist(),
            "metadata": prompts.column(schema.METADATA).to_pylist(),
        })
        self.batch = args.prompts_per_step * args.group_size

    def pear_ray_reward(self, record: list):
        """The reward pear_ray computes (stages/common.py decoded_rewards: the response ids decoded with
        skip_special_tokens, then the task's verifier), each call's inputs and rewards appended to `record`."""
        def reward(completion_ids, answer, metadata, **_) -> list[float]:
            texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
            rewards = [float(self.task.score(text, a, m)) for text, a, m in zip(texts, answer, metadata)]
            record.append((completion_ids, answer, metadata, rewards))
            return rewards
        return reward

    def run(self, harness: Harness, threads: int) -> dict:
        """One GRPOTrainer run under `harness`: its step times both ways, the seconds per step it spent generating,
        rewarding and logging, what it rewarded and the prompt ids it generated from."""
        import torch
        from transformers import AutoModelForCausalLM, TrainerCallback
        from trl import GRPOConfig, GRPOTrainer

        args = self.args
        torch.set_num_threads(threads)
        model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        record, prompts_seen, spent = [], set(), {"generate": [], "reward": [], "log": []}

        def timed(function, name: str):
            @functools.wraps(function)  # TRL names the reward's metrics after the function
            def call(*positional, **keywords):
                started = time.perf_counter()
                out = function(*positional, **keywords)
                spent[name].append(time.perf_counter() - started)
                return out
            return call

        def noting_prompts(generate):
            """TRL calls the model's own generate: note the prompts' ids (left-padded) it is given."""
            def call(*positional, input_ids, attention_mask, **keywords):
                prompts_seen.update(tuple(row[keep].tolist()) for row, keep in zip(input_ids, attention_mask.bool()))
                return generate(*positional, input_ids=input_ids, attention_mask=attention_mask, **keywords)
            return call

        model.generate = noting_prompts(timed(model.generate, "generate"))
        reward = timed(self.pear_ray_reward(record) if harness.reward == "pear_ray" else exact_match, "reward")

        class StepEnds(TrainerCallback):
            def __init__(self):
                self.times = []

            def on_step_end(self, *_, **__):
                self.times.append(time.perf_counter())

        steps = StepEnds()
        config = GRPOConfig(
            output_dir=str(self.folder / "trl-out"), use_cpu=True, seed=0,
            max_steps=args.warmup + args.steps, learning_rate=LEARNING_RATE, per_device_train_batch_size=self.batch,
            num_generations=args.group_size, max_completion_length=args.max_tokens, temperature=1.0, epsilon=0.2,
            epsilon_high=0.28, loss_type="dapo", beta=0.0, **harness.config())
        trainer = GRPOTrainer(model=model, processing_class=self.tokenizer, reward_funcs=reward, args=config,
                              train_dataset=self.dataset, callbacks=[steps])
        trainer.log = timed(trainer.log, "log")
        with open(os.devnull, "w") as console, contextlib.redirect_stdout(console), \
                contextlib.redirect_stderr(console):  # the log lines and the bar: formatted and written, not shown
            trainer.train()
        times, w = steps.times, args.warmup
        intervals = [b - a for a, b in zip(times[w - 1:], times[w:])]
        timed_steps = len(times) - w
        return {"median": self.batch / statistics.median(intervals),
                "wall": self.batch * timed_steps / (times[-1] - times[w - 1]),
                "step_seconds": statistics.median(intervals),
                "warmup_step_seconds": statistics.median(b - a for a, b in zip(times[:w - 1], times[1:w])),
                "generate_seconds": statistics.median(spent["generate"][w:]),
                "reward_seconds": statistics.median(spent["reward"][w:]),
                "log_seconds": sum(spent["log"]) / len(times),  # per step: some harnesses log every 10th
                "record": record, "prompts_unknown": len(prompts_seen - self.prompt_ids),
                "prompts_seen": len(prompts_seen)}

    def prompt_check(self, runs: dict[str, list[dict]]) -> str:
        """One line: whether every prompt TRL generated from, in every run, is token for token one of pear_ray's."""
        unknown = sum(run["prompts_unknown"] for name in runs for run in runs[name])
        seen = max(run["prompts_seen"] for name in runs for run in runs[name])
        return (f"prompt check: {'every' if not unknown else f'NOT every ({unknown} unknown)'} prompt TRL generated "
                f"from is token for token one of pear_ray's {self.dataset.num_rows} train prompts "
                f"({len(self.prompt_ids)} distinct; up to {seen} distinct in a run)")

    def check_pear_ray_reward(self, record: list) -> str:
        """The rewards the project harness gave TRL against pear_ray's decoded_rewards (its Ray verifier tasks) on
        the same completions: one line saying how many agree."""
        import pyarrow as pa
        import ray

        from pear_ray.data import schema
        from pear_ray.runtime import init_ray
        from pear_ray.stages.common import decoded_rewards

        ids, answers, metadata, given = (sum((list(call[i]) for call in record), []) for i in range(4))
        table = pa.table({schema.RESPONSE_IDS: ids, schema.ANSWER: answers, schema.METADATA: metadata})
        init_ray(num_cpus=1)
        try:
            scored, _ = decoded_rewards(table, self.tokenizer, self.task, self.job.task)
        finally:
            ray.shutdown()
        theirs = scored.column(schema.REWARD).to_pylist()
        equal = sum(a == b for a, b in zip(given, theirs))
        return (f"reward check (project): pear_ray's decoded_rewards on the {len(given)} completions of its last run: "
                f"{equal}/{len(given)} equal, mean reward {statistics.mean(theirs):.3f}")

    def check_rule(self, record: list) -> str:
        """The peer's rule against pear_ray's reward on the completions a project-harness run rewarded (TRL hands
        the rule the same texts, decoded the same way): how many agree."""
        texts = [text for ids, *_ in record for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        answers, given = (sum((list(call[i]) for call in record), []) for i in (1, 3))
        rule = exact_match([[{"content": text}] for text in texts], answers)
        differ = [(text, answer, r, g) for text, answer, r, g in zip(texts, answers, rule, given) if r != g]
        return (f"reward check (peer): its rule against pear_ray's reward on the same {len(rule)} completions: "
                f"{len(rule) - len(differ)}/{len(rule)} equal"
                + "".join(f"\n  differs: {text!r} (answer {answer}): rule {r}, pear_ray {g}" for text, answer, r, g
                          in differ[:3]))


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):6.1f} ({min(values):.0f}-{max(values):.0f})"


def run_rounds(workload: Workload, harnesses: dict[str, Harness], rounds: int, threads: int) -> dict[str, list]:
    """Every harness once per round, starting one later each round; {name: [its runs' figures]}, each with the
    share of the box other processes took during the run."""
    names, runs = list(harnesses), {name: [] for name in harnesses}
    for round_ in range(rounds):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            run, others = measured(workload.run, harnesses[name], threads)
            runs[name].append(run | {"others": others})
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_grpo_workload(parser)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of TRL's one process")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vary", action="store_true", help="also the project harness with one difference from "
                        "the peer's changed at a time")
    parser.add_argument("--quiet", type=float, default=0.1, help="a round counts as quiet when other processes "
                        "took less than this share of the box during both runs compared")
    parser.add_argument("--venv", type=Path, default=Path("/tmp/trl-venv"))
    parser.add_argument("--trl", default="1.16.0")
    args = parser.parse_args()
    ensure_trl(args.venv, args.trl)

    import trl

    from pear_ray.models import TinyModelSpec, build_tiny_model

    harnesses = reconciliation() if args.vary else {"project": PROJECT, "peer": PEER}
    load_before = other_load()
    machine = MachineLoad()
    with tempfile.TemporaryDirectory() as folder:
        workload = Workload(args, Path(folder), build_tiny_model(TinyModelSpec(), Path(folder) / "model"))
        machine.start()
        runs = run_rounds(workload, harnesses, args.rounds, args.threads)
        load = machine.stop()
        checks = [workload.check_pear_ray_reward(runs["project"][-1]["record"]),
                  workload.check_rule(runs["project"][-1]["record"])]
    print(f"\nTRL {trl.__version__} GRPOTrainer, tiny Qwen2 {TinyModelSpec()}: basic_arithmetic, "
          f"{args.prompts_per_step} prompts x {args.group_size} generations, <= {args.max_tokens} tokens, "
          f"temperature 1, 1 update per generation batch, clip 0.2/0.28, loss_type dapo, beta 0, transformers "
          f"generate, CPU, {args.threads} torch threads, one process; {args.rounds} alternating rounds x {args.steps} "
          f"steps after {args.warmup} warm-up")
    print(f"{'harness':>32} {'samples/s (own timing)':>22} {'by median step':>17} {'by wall clock':>17} "
          f"{'x project':>9} {'quiet':>9} {'step s':>6} {'gen s':>6} {'reward ms':>9} {'log ms':>6} {'others':>6}")
    for name, harness in harnesses.items():
        mine = runs[name]
        ratios = [(run[harness.timing] / base[PROJECT.timing], max(run["others"], base["others"]))
                  for run, base in zip(mine, runs["project"])]
        quiet = [ratio for ratio, others in ratios if others < args.quiet]
        median = {key: statistics.median(run[key] for run in mine)
                  for key in ("step_seconds", "generate_seconds", "reward_seconds", "log_seconds", "others")}
        print(f"{name:>32} {spread([r[harness.timing] for r in mine]):>22} {spread([r['median'] for r in mine]):>17} "
              f"{spread([r['wall'] for r in mine]):>17} {statistics.median(r for r, _ in ratios):9.2f} "
              f"{f'{statistics.median(quiet):.2f} ({len(quiet)})' if quiet else '-':>9} {median['step_seconds']:6.3f} "
              f"{median['generate_seconds']:6.3f} {1e3 * median['reward_seconds']:9.2f} "
              f"{1e3 * median['log_seconds']:6.2f} {100 * median['others']:5.0f}%")
    print(f"samples/s: median (min-max) over rounds; x project: median over rounds of the ratio to that round's "
          f"project figure, each by its harness's own timing; quiet: the same over the rounds where other processes "
          f"took under {100 * args.quiet:.0f}% of the box during both runs (how many); step, gen, reward: medians over "
          f"timed steps; log: seconds in Trainer.log per step; others: share of the box other processes took during a "
          f"run (median)")
    print("per round, samples/s by median step / by wall clock (others' share):")
    for name in harnesses:
        print(f"{name:>32}  " + "  ".join(f"{r['median']:3.0f}/{r['wall']:3.0f} ({100 * r['others']:.0f}%)"
                                          for r in runs[name]))
    print(workload.prompt_check(runs))
    print("\n".join(checks))
    print(load)
    print(f"machine before: {load_before}\nmachine after:  {other_load()}")


if __name__ == "__main__":
    main()
