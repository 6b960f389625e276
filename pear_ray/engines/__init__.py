"""Engines behind the actors, one process's work each and no Ray: the rollout engines behind one interface
(`rollout_engine`: `RolloutEngine`, `Sample`, the model-folder and weight-set checks), vLLM's (`vllm_engine`) and a
transformers sampling loop for tiny CPU models (`transformers_engine`), started by backend (`backends`); teacher-
forced scoring with the learner's forward (`hf_scorer`, shared by the learner, the reference actor and the
transformers engine); and a DeepSpeed learner rank (`deepspeed_learner`), with LoRA adapters when asked (`lora`).

Import the module you need directly: `vllm_engine` sets vLLM's environment variables for the process
when imported, which must not leak into a learner that only needs a sibling module (`rollout_engine` and
`backends` do not import it).
"""
