"""The gate before SFT: a job stops before paying for SFT and RL when its PEAR variant cannot tell two behaviour
sources apart at the first response token, where the scripted policy chooses its style."""

from __future__ import annotations

from pydantic import Field, model_validator

from pear_ray.config.base import Section


class GateConfig(Section):
    """Under the student SFT starts from, with one variant's PEAR settings: the mean weight of the first response
    token in rows of the `numerator` source over that in rows of the `denominator` source (the data's `source`
    column). Every run folder of the job (each seed and cell of an experiment) must reach `min_ratio` before any of
    them trains; the readings go to gate.json in the job's folder."""

    variant: str = Field(min_length=1, description="the SFT variant (one of the job's sft.variants, or the one "
                         "sft.pear describes) whose PEAR level, gamma, block size and clips weight the data")
    numerator: str = Field("trace", min_length=1, description="the behaviour source (a value of the data's source "
                           "column) whose first-token weight is the ratio's numerator; default trace, the scripted "
                           "two_style policy's worked traces")
    denominator: str = Field("bare", min_length=1, description="the behaviour source whose first-token weight is the "
                             "ratio's denominator; default bare, the scripted two_style policy's bare answers")
    min_ratio: float = Field(gt=0, description="the smallest ratio that lets the job go on to SFT, e.g. 10 (the "
                             "variant then weights the numerator's style choice ten times the denominator's)")

    @model_validator(mode="after")
    def _two_sources(self) -> GateConfig:
        if self.numerator == self.denominator:
            raise ValueError(f"gate.numerator and gate.denominator are both {self.numerator!r}: the gate compares "
                             "two behaviour sources")
        return self
