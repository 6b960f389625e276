"""The job's stages as driver functions over the actors: score -> sft -> rl -> eval (docs/guide.md, "What a run does").

Each stage writes into the run folder and can be resumed: a finished stage is skipped, an unfinished one
continues from its last checkpoint.
"""
