"""The ``analysis:`` section of a study spec: how results become the numbers that are tested.

Every choice here changes what a test is computed on, so each has a default a reviewer would accept and is named in
every table (the ``reduction`` column) and in the Methods text:

``position_reduction``
    how a probe's rows at several token positions of one layer become one value. ``last`` (default): the last
    token of the prompt, where the answer is read out. Recovery is roughly conserved across positions (a layer's
    positions share about 1 between them), so a *mean* over positions is about 1 / prompt length at every layer and
    erases the layer effect; it is therefore not offered. ``max``: the best position ("did any position recover the
    answer?"); ``sum``: the layer's total over positions; ``subject``: the sum over the probe's subject tokens;
    ``subject_last``: the subject's last token; an integer: that token index (negative counts from the end, ``-1``
    is ``last``). The subject is the probe label named by ``subject_field`` (a column of the results), matched to
    the patched tokens.
``head_reduction``
    attention heads of one layer: ``sum`` (default: the layer's total, the scale of its attention output) or
    ``each`` (heads are analysed one by one, in the per-head table, and not pooled into a layer test). Never the
    mean, which divides a single head's effect by the number of heads.
``subject``
    the unit of replication: ``probe`` (default) or ``clean_prompt`` (probes sharing a clean prompt are averaged
    first, because they are not independent observations).
exclusion rules
    ``min_clean_logit_diff`` (the model must prefer the answer in the clean run by at least this margin),
    ``require_flip`` (the corruption must flip the preference: clean and corrupted logit differences of opposite
    sign), ``min_abs_diff`` (the recovery's denominator at least this in magnitude: |clean - corrupted| of the logit
    difference; across models |source model's run - target model's run|). Applied to probes before
    any statistic; the excluded probes are listed with the rule that excluded them.
``group``
    the probe label whose values are the groups of the between-group tests (mixed ANOVA, Welch tests, per-group
    intervals). Default: ``knowledge_type`` when the probes carry it, else the first label that can group them,
    never a provenance field such as ``pmids`` or ``bioasq_id`` (:mod:`clap.groups`). ``clap analyze``, ``report``,
    ``compare`` and ``run`` take ``--group`` for the same field.
``domain``
    the probe label whose values are the domains of the cross-domain table (:mod:`analyses.domains`: the
    localization analysis repeated within each domain, groups compared there). Default: ``topic`` when the probes
    carry it with at least two values; a declared label the probes lack is refused.
``interval``
    confidence intervals of means: ``t`` (default; holds its coverage at study sizes), ``bca`` or ``percentile``
    (bootstrap; the percentile interval covers only 83-87 % of a nominal 95 % at 6 probes).
``ss_type``
    sums of squares of the mixed ANOVA: ``2`` (pingouin's weighted means, the default) or ``3`` (unweighted means
    of the groups, for unbalanced groups).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

POSITION_RULES = ("last", "max", "sum", "subject", "subject_last")
HEAD_RULES = ("sum", "each")
SUBJECT_UNITS = ("probe", "clean_prompt")
INTERVALS = ("t", "bca", "percentile")

PositionReduction = Literal["last", "max", "sum", "subject", "subject_last"] | int


class AnalysisOptions(BaseModel):
    """Validated ``analysis:`` section (also built from ``clap analyze`` flags; the flags win)."""

    model_config = ConfigDict(extra="forbid")

    position_reduction: PositionReduction = "last"
    head_reduction: Literal["sum", "each"] = "sum"
    subject_field: str = "subject"
    subject: Literal["probe", "clean_prompt"] = "probe"
    group: str | None = Field(default=None, min_length=1)
    domain: str | None = Field(default=None, min_length=1)
    min_clean_logit_diff: float | None = None
    require_flip: bool = False
    min_abs_diff: float | None = Field(default=None, ge=0)
    interval: Literal["t", "bca", "percentile"] = "t"
    ss_type: Literal[2, 3] = 2

    @field_validator("position_reduction", mode="before")
    @classmethod
    def _index_text(cls, value: object) -> object:
        """``"3"`` / ``"-1"`` from a command line or YAML string mean a token index."""
        if isinstance(value, str) and value.lstrip("-").isdigit():
            return int(value)
        if isinstance(value, str) and value not in POSITION_RULES:
            raise ValueError(f"unknown position reduction {value!r}; expected one of {', '.join(POSITION_RULES)} or a "
                             "token index such as 0 or -1 "
                             "(the mean over positions is not offered: it erases layer effects)")
        return value


def parse_position_reduction(value: str | int) -> str | int:
    """``"last"`` -> ``"last"``, ``"-1"`` -> ``-1``; unknown names raise :class:`~clap.errors.ClapError`."""
    from pydantic import ValidationError

    from clap.errors import ClapError

    try:
        return AnalysisOptions(position_reduction=value).position_reduction
    except ValidationError as exc:
        reason = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise ClapError(f"--position-reduction {value}: {reason}") from None
