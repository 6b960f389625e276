"""What several test files share: running the CLI on a job, the learner's test batches, the RL stage alone,
the plug-ins jobs load, and a local cluster run by Ray's own autoscaler (autoscaling.py)."""
