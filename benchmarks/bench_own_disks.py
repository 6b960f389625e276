"""A whole job on nodes that share no disk (prints its figures; not a test): the smoke job's score (given scored rows),
SFT, RL and eval stages into a run folder in a bucket (moto's S3 server on loopback), on the local autoscaling
cluster (tests/support/autoscaling.py) whose head and each launched node cache the run folder in a scratch folder of
their own, the learner rank on a `learner` node and the rollout actor on a `rollout` node.

The driver runs in a private mount namespace (`unshare -m`, so root) with a tmpfs over its scratch folder: no Ray
process can read the driver's copy of the run folder, only the bucket. The job finishing shows that nothing reads
another node's files; the figures say what each node fetched and how long the job took.

Run: sudo .venv/bin/python benchmarks/bench_own_disks.py [--rl-steps N]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.autoscaling import AutoscalingCluster  # noqa: E402
from support.learner import write_scored_sft_rows  # noqa: E402
from support.provider.reclaimable_provider import NODE_DISKS_ENV  # noqa: E402
from support.stores import moto_server  # noqa: E402

BUCKET, PREFIX = "disks", "run"


def fetched(disk: Path) -> dict[str, int]:
    """Bytes in a node's copy of the run folder, by what they are (models/<name>, data, checkpoints/<name>)."""
    copy = disk / "s3" / BUCKET / PREFIX
    sizes: dict[str, int] = defaultdict(int)
    for file in copy.rglob("*"):
        parts = file.relative_to(copy).parts
        if file.is_file() and parts[0] in ("models", "data", "checkpoints"):
            sizes["/".join(parts[:2]) if parts[0] != "data" else parts[0]] += file.stat().st_size
    return dict(sorted(sizes.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rl-steps", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="own-disks-"))
    disks, driver = work / "disks", work / "driver"
    driver.mkdir()
    data = write_scored_sft_rows(work / "sft.jsonl", 32)
    job = [str(ROOT / ".venv" / "bin" / "pear-ray"), "run", str(ROOT / "jobs" / "smoke.yaml"),
           "stages=[score,sft,rl,eval]", f"data.sft={data}", "models.behavior=null", "score.teacher_sft_steps=0",
           f"rl.steps={args.rl_steps}", "rl.drop_constant_groups=false",
           "resources.rollout={num_actors: 1, num_cpus: 0.5, resources: {rollout: 1}}",
           "resources.learner={num_ranks: 1, num_cpus: 0.5, resources: {learner: 1}}",
           "--run-dir", f"s3://{BUCKET}/{PREFIX}"]
    hide_driver_copy = f'mount -t tmpfs pear-ray-driver {driver} && exec "$@"'
    with moto_server() as s3:
        s3.create_bucket(BUCKET)
        node_env = s3.env(PEAR_RAY_SCRATCH=str(disks / "head"), **{NODE_DISKS_ENV: str(disks)})
        with AutoscalingCluster(max_workers={"rollout": 1, "learner": 1}, node_env=node_env) as cluster:
            env = {**os.environ, **cluster.client_env(RAY_ADDRESS=cluster.gcs_address,
                                                      **s3.env(PEAR_RAY_SCRATCH=str(driver)))}
            started = time.monotonic()
            result = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", hide_driver_copy, "sh",
                                     *job], env=env, capture_output=True, text=True, cwd=ROOT)
            seconds = time.monotonic() - started
        bucket = s3.objects(f"{BUCKET}/{PREFIX}")
    if result.returncode != 0:
        sys.exit(f"the job failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    print(f"job (score, SFT, RL {args.rl_steps} steps, eval) into s3://{BUCKET}/{PREFIX}, the driver's copy hidden "
          f"from every Ray process: finished in {seconds:.1f} s")
    print(f"bucket: {len(bucket)} objects, {sum(bucket.values()):,} bytes")
    for disk in sorted(disks.iterdir()):
        print(f"{disk.name:>5}: " + ", ".join(f"{what} {size:,} B" for what, size in fetched(disk).items()))
    print(f"(work folder: {work})")


if __name__ == "__main__":
    main()
