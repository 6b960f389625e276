"""What the benchmarks share: how busy the machine was (their figures assume an otherwise idle 2-core box), and
variants timed in rotating order so that drift from other processes hits every variant alike."""

from __future__ import annotations

import os
import socket
import threading
import time

import psutil


class MachineLoad(threading.Thread):
    """CPU time of this benchmark's process tree (driver, Ray's processes, actors, children) and of the whole
    machine over the run, sampled every `interval` s: what other processes took is the difference. The figures
    assume an otherwise idle box; this line says how far from idle it was."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval, self.halt = interval, threading.Event()
        self.ours: dict[int, float] = {}  # pid -> latest CPU seconds seen

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return t.user + t.nice + t.system + t.irq + t.softirq

    def _sample(self) -> None:
        me = psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
            except psutil.Error:
                continue
            self.ours[p.pid] = t.user + t.system

    def start(self) -> None:
        self._sample()
        self.base, self.wall, self.machine = dict(self.ours), time.perf_counter(), self._busy()
        super().start()

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            self._sample()

    def stop(self) -> str:
        self.halt.set()
        self.join()
        self._sample()
        ours = sum(v - self.base.get(pid, 0.0) for pid, v in self.ours.items())
        wall, cores = time.perf_counter() - self.wall, psutil.cpu_count()
        others = max(0.0, self._busy() - self.machine - ours)
        self.others_share = others / (wall * cores)  # what the line below says, as a number
        return (f"CPU over the run ({wall:.0f} s x {cores} cores): this benchmark {ours:.0f} core-s, other processes "
                f"{others:.0f} core-s ({100 * others / (wall * cores):.0f}% of the box)")


def measured(action, *arguments) -> tuple[object, float]:
    """`action(*arguments)`, and the share of the box other processes took meanwhile (MachineLoad's figure)."""
    machine = MachineLoad()
    machine.start()
    result = action(*arguments)
    machine.stop()
    return result, machine.others_share


def other_load() -> str:
    """CPU use of processes outside this benchmark's process tree over one second, and the load average."""
    me = psutil.Process()
    mine = {me.pid} | {child.pid for child in me.children(recursive=True)}
    procs = [p for p in psutil.process_iter(["cmdline", "name"]) if p.pid not in mine]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(1.0)
    busy = []
    for p in procs:
        try:
            percent = p.cpu_percent(None)
        except psutil.Error:
            continue
        if percent >= 20:
            command = " ".join(p.info["cmdline"] or [p.info["name"] or "?"]).split()
            busy.append(f"{percent:.0f}% {' '.join(command)[:70]}")
    return f"load avg (1 min) {os.getloadavg()[0]:.2f}; other busy processes: {'; '.join(busy) or 'none'}"


def rotating_rounds(steps: dict, rounds: int, time_step, baseline: str) -> tuple[dict, dict]:
    """Time every variant once per round, starting each round one variant later; returns per-variant seconds and
    per-round ratios to `baseline` (each round's own baseline time), as {name: [one value per round]}."""
    names = list(steps)
    seconds = {name: [] for name in names}
    ratios = {name: [] for name in names}
    for round_ in range(rounds):
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        timed = {name: time_step(steps[name]) for name in order}
        for name, t in timed.items():
            seconds[name].append(t)
            ratios[name].append(t / timed[baseline])
    return seconds, ratios


def free_port() -> int:
    """A port free on loopback now (a rendezvous for a learner built in the benchmark's process)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def time_steps(step, n: int) -> float:
    """Mean seconds of `step()` over n calls."""
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n


def add_grpo_workload(parser) -> None:
    """The GRPO workload bench_rl.py, bench_trl_grpo.py and bench_rl_vs_trl.py run, declared once so the two sides
    of the comparison cannot drift apart: train prompts, prompts per step, samples per prompt, response length,
    steps."""
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=15, help="steps left out of the figures: a fresh Ray instance "
                        "(each `pear-ray run`) starts its task workers (scoring, verifiers) on demand over the first "
                        "~15 RL steps, a few core-seconds each, on a 2-core box")
