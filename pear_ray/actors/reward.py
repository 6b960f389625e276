"""The reward pool: actors that hold the job's reward models (task.reward_models: sequence classifiers, LLM judges)
and score batches of decoded samples, one `reward_<name>` column per model.

The rules are the verifiers' (tasks/verify.py): a batch that runs past its time (the model's row_timeout_s x the
rows it has) gives 0 to its samples and counts them as timeouts, a model that raises gives 0 and counts errors, a
judge answer with no number in it gives 0 and counts as unparsed; a score is in [0, 1]. An actor that dies or hangs
is the pool's to handle (actors/pool/): it is replaced and its batches scored again, with the same result, since a
classifier's forward and a judge's greedy answer depend on the batch alone.

`RewardModels` is how the stages use it: the pool lives in a small actor of its own (`RewardService`), so the Ray
tasks that score RL's samples beside them can call it as the driver's eval does.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
import torch

from pear_ray.actors.pool import ActorPool, batch_stats
from pear_ray.config import RewardModelConfig, RewardResources
from pear_ray.data import schema
from pear_ray.data.io import encode_prompt
from pear_ray.rewards import parse_judge_score, render_template, reward_column, sigmoid
from pear_ray.runtime import actor_options, use_assigned_cpus
from pear_ray.storage import materialize

TEXT_COLUMNS = (schema.PROMPT, schema.RESPONSE, schema.ANSWER)  # what the reward models read of a sample
SCORE_TYPE = pa.float64()


class TimedOut(Exception):
    """A batch that ended past its deadline."""


class RewardWorker:
    """Every reward model of the job, loaded once; `score` adds their columns to a batch of decoded samples."""

    def __init__(self, folders: dict[str, str], models: list[RewardModelConfig]):
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        use_assigned_cpus()
        self.models = models
        self.loaded: dict[str, tuple[Any, Any]] = {}
        for config in models:
            folder = materialize(folders[config.name])
            loader = AutoModelForSequenceClassification if config.kind == "classifier" else AutoModelForCausalLM
            tokenizer = AutoTokenizer.from_pretrained(folder)
            tokenizer.truncation_side = "left"  # a long sample keeps its response
            tokenizer.padding_side = "left" if config.kind == "judge" else "right"  # a judge continues its prompt
            model = loader.from_pretrained(folder, dtype=torch.float32).eval()
            self.loaded[config.name] = model, tokenizer

    @ray.method(num_returns=2)
    def score(self, table: pa.Table):
        """The batch's text columns (prompt, response, answer) -> one float64 `reward_<name>` column per model;
        stats["counts"] has each model's errors, timeouts (and a judge's unparsed answers)."""
        started = time.perf_counter()
        columns, counts = {}, Counter()
        for config in self.models:
            scores, model_counts = self._score_model(config, table)
            columns[reward_column(config.name)] = pa.array(scores, SCORE_TYPE)
            counts.update({f"{reward_column(config.name)}_{what}": n for what, n in model_counts.items()})
        return pa.table(columns), batch_stats(table.num_rows, 0, started, counts=dict(counts))

    def _score_model(self, config: RewardModelConfig, table: pa.Table) -> tuple[list[float], Counter]:
        """One model's scores of the batch, `batch_rows` samples at a time, under the deadline of the batch."""
        texts = {column: table.column(column).to_pylist() if column in table.column_names else [""] * table.num_rows
                 for column in TEXT_COLUMNS}
        deadline = time.perf_counter() + config.row_timeout_s * table.num_rows
        counts = Counter({"errors": 0, "timeouts": 0, **({"unparsed": 0} if config.kind == "judge" else {})})
        scores: list[float] = []
        for start in range(0, table.num_rows, config.batch_rows):
            rows = {column: values[start:start + config.batch_rows] for column, values in texts.items()}
            size = len(rows[schema.RESPONSE])
            try:
                if time.perf_counter() >= deadline:
                    raise TimedOut
                part = self._classify(config, rows) if config.kind == "classifier" else self._judge(config, rows)
                if time.perf_counter() > deadline:
                    raise TimedOut
            except TimedOut:
                counts["timeouts"] += size
                part = [0.0] * size
            except Exception:  # noqa: BLE001 - a model that fails on a batch gives its samples 0, as a verifier does
                counts["errors"] += size
                part = [0.0] * size
            if config.kind == "judge":
                counts["unparsed"] += sum(value is None for value in part)
            scores += [0.0 if value is None else float(value) for value in part]
        return scores, counts

    @torch.no_grad()
    def _classify(self, config: RewardModelConfig, rows: dict[str, list[str]]) -> list[float]:
        """sigmoid(logit) of each (prompt, response), in the classifier's chat template where it has one."""
        model, tokenizer = self.loaded[config.name]
        if getattr(tokenizer, "chat_template", None):
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                                    {"role": "assistant", "content": response}], tokenize=False)
                     for prompt, response in zip(rows[schema.PROMPT], rows[schema.RESPONSE])]
        else:
            texts = [prompt + response for prompt, response in zip(rows[schema.PROMPT], rows[schema.RESPONSE])]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, add_special_tokens=False,
                           max_length=model.config.max_position_embeddings)
        logits = model(**inputs).logits[:, 0]
        return sigmoid(logits.numpy()).tolist()

    @torch.no_grad()
    def _judge(self, config: RewardModelConfig, rows: dict[str, list[str]]) -> list[float | None]:
        """The judge's greedy answer to each sample's question, parsed (None: no number in it)."""
        model, tokenizer = self.loaded[config.name]
        room = model.config.max_position_embeddings - config.max_tokens
        prompts = [encode_prompt(tokenizer, render_template(config.template, response=response, prompt=prompt,
                                                            answer=answer))[-room:]
                   for prompt, response, answer in zip(rows[schema.PROMPT], rows[schema.RESPONSE],
                                                       rows[schema.ANSWER])]
        inputs = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        out = model.generate(**inputs, do_sample=False, max_new_tokens=config.max_tokens, pad_token_id=pad)
        answers = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        pattern = re.compile(config.score_pattern)
        return [parse_judge_score(answer, pattern, config.max_score) for answer in answers]


def reward_pool(folders: dict[str, str], models: list[RewardModelConfig], resources: RewardResources) -> ActorPool:
    """resources.reward.num_actors reward actors, each placed by the role's resources and holding every model."""
    worker = ray.remote(RewardWorker).options(**actor_options(resources))
    return ActorPool.start(lambda slot: worker.remote(folders, models), resources.num_actors,
                           max_in_flight=resources.max_in_flight, call_timeout_s=resources.call_timeout_s,
                           role="reward")


def text_columns(table: pa.Table) -> pa.Table:
    """What of a table the reward models read (and all that travels to them)."""
    return table.select([column for column in TEXT_COLUMNS if column in table.column_names])


def pool_rewards(pool: ActorPool, table: pa.Table, batch_rows: int) -> tuple[pa.Table, dict[str, int]]:
    """The pool's score columns for a table's samples, in row order, cut into batches of `batch_rows` that the
    actors share; and the counts (errors, timeouts, unparsed) summed over the batches."""
    texts = text_columns(table)
    batches = [ray.put(texts.slice(start, batch_rows)) for start in range(0, table.num_rows, batch_rows)]
    done, counts = {}, Counter()
    for index, batch_ref, stats in pool.map("score", batches):
        done[index] = batch_ref
        counts.update(stats["counts"])
    return pa.concat_tables(ray.get([done[index] for index in range(len(batches))])), dict(counts)


class RewardService:
    """The reward pool behind one actor, so that Ray tasks (RL's scoring beside the samples) use it as the driver
    does: one call at a time, each spread over the pool's actors."""

    def __init__(self, folders: dict[str, str], models: list[RewardModelConfig], resources: RewardResources):
        self.pool = reward_pool(folders, models, resources)
        self.batch_rows = max(config.batch_rows for config in models)

    def score(self, table: pa.Table) -> tuple[pa.Table, dict[str, int]]:
        return pool_rewards(self.pool, table, self.batch_rows)

    def shutdown(self) -> None:
        self.pool.shutdown()


class RewardModels:
    """A handle on the job's reward models (picklable, so a Ray task can take it): `add_scores` appends their
    columns to a table of decoded samples."""

    def __init__(self, service, names: list[str]):
        self.service, self.names = service, names

    @classmethod
    def start(cls, folders: dict[str, str | Path], models: list[RewardModelConfig],
              resources: RewardResources) -> RewardModels:
        """The pool's actors, started behind a service actor (which takes no CPU of its own)."""
        service = ray.remote(RewardService).options(num_cpus=0).remote(
            {name: str(folder) for name, folder in folders.items()}, models, resources)
        return cls(service, [config.name for config in models])

    def add_scores(self, table: pa.Table) -> tuple[pa.Table, dict[str, int]]:
        """The table with a `reward_<name>` column per model, and the models' counts."""
        scores, counts = ray.get(self.service.score.remote(text_columns(table)))
        for column in scores.column_names:
            table = schema.append_column(table, column, scores.column(column), SCORE_TYPE)
        return table, counts

    def shutdown(self) -> None:
        ray.get(self.service.shutdown.remote())
        ray.kill(self.service)
