"""Engines behind the actors, one process's work each and no Ray: vLLM generation and scoring
(`vllm_engine`), a transformers scorer (`hf_scorer`), and a DeepSpeed learner rank (`deepspeed_learner`).

Import the module you need directly: `vllm_engine` sets vLLM's environment variables for the process
when imported, which must not leak into a learner that only needs a sibling module.
"""
