"""What one analysis is asked to do: one options object, built by every caller the same way.

:class:`AnalyzeOptions` gathers what used to arrive as a long list of keywords from three option systems:

* the **analysis** section (:class:`clap.analysis_options.AnalysisOptions`: reductions, subject unit, exclusion
  rules, group, interval, sums of squares), given whole (``analysis``; a study's ``analysis:`` section) or, when
  absent, read from the spec recorded in ``run.json``; single fields of it can be overridden (``overrides``: the
  command line's ``--position-reduction``, ``--group``, ...), and the overrides win;
* the **tests**: ``dv``, the slices (``metrics``, ``site_kinds``), the legacy ``agg``, the ``missing`` policy,
  ``alpha``, the bootstrap's ``n_boot`` and ``seed``;
* the **outputs**: ``out_dir``, ``figures``, ``dpi``, and the folders of the study's derived runs
  (``additivity``, ``ablation``) whose sections join the report.

``clap analyze`` / ``clap report`` build it from their flags, ``clap run`` from the study file, Python users with
:func:`analyze_options` (``analyze(folder, group="knowledge_type")`` maps its keywords through it): a name of the
analysis section becomes an override, any other must be a field here, and an unknown name is refused with the
nearest valid ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from clap.analysis_options import AnalysisOptions
from clap.errors import ClapError, closest


class AnalyzeOptions(BaseModel):
    """Everything :func:`analyses.pipeline.analyze` is asked to do (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    #: where tables, caveats, figures (and the report) go; None: ``RESULTS_DIR/analysis``
    out_dir: Path | None = None
    #: the dependent variable of every test
    dv: str = "recovery"
    #: restrict the slices analysed (empty: every metric / every site kind with 2+ layers)
    metrics: tuple[str, ...] = ()
    site_kinds: tuple[str, ...] = ()
    #: legacy: one pandas aggregation over all of a cell's rows instead of the named reductions
    agg: Literal["mean", "median", "max", "min", "sum"] | None = None
    #: missing-cell policy of :func:`analyses.select.prepare`
    missing: Literal["drop_subjects", "drop_levels", "error"] = "drop_subjects"
    #: resamples of bootstrap intervals, and their seed (None: the run's seed, so a study's intervals reproduce)
    n_boot: int = Field(default=2000, ge=1)
    seed: int | None = None
    #: significance level used by the caveats, findings and highlighting
    alpha: float = Field(default=0.05, gt=0, lt=1)
    #: draw and save the figures (False: tables only, much faster), and the PNGs' resolution
    figures: bool = True
    dpi: int = Field(default=200, ge=1)
    #: the whole analysis section; None: the spec's ``analysis:`` recorded in run.json, else the defaults
    analysis: AnalysisOptions | None = None
    #: single fields of the analysis section that win over ``analysis`` (command-line flags)
    overrides: dict[str, Any] = Field(default_factory=dict)
    #: results folders of the study's derived runs, analysed against this study's rows (:mod:`analyses.derived`)
    additivity: Path | None = None
    ablation: Path | None = None

    @field_validator("metrics", "site_kinds", mode="before")
    @classmethod
    def _none_is_all(cls, value: Any) -> Any:
        """``None`` (a command line without the flag) and a single name both mean what they say."""
        if value is None:
            return ()
        return (value,) if isinstance(value, str) else value

    @field_validator("overrides")
    @classmethod
    def _known_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        """Overrides are fields of the analysis section with valid values; ``None`` means "not overridden"."""
        value = {k: v for k, v in value.items() if v is not None}
        unknown = [k for k in value if k not in AnalysisOptions.model_fields]
        if unknown:
            raise ValueError(f"not a field of the analysis section: {', '.join(unknown)}")
        AnalysisOptions(**value)  # a bad value is refused here, before any result is read
        return value

    def updated(self, **names: Any) -> AnalyzeOptions:
        """A copy with ``names`` applied as :func:`analyze_options` applies them (overrides are merged)."""
        return analyze_options(self, **names)


def option_names() -> list[str]:
    """Every keyword :func:`analyze_options` accepts."""
    own = [n for n in AnalyzeOptions.model_fields if n != "overrides"]
    return own + [n for n in AnalysisOptions.model_fields if n not in own]


def analyze_options(base: AnalyzeOptions | None = None, **names: Any) -> AnalyzeOptions:
    """``base`` (default: the defaults) with keyword ``names`` applied: a field of :class:`AnalyzeOptions` is set, a
    field of the analysis section (``group``, ``position_reduction``, ``head_reduction``, ``subject``,
    ``interval``, ``ss_type``, exclusion rules, ...) becomes an override; ``None`` leaves a value as it is.

    Raises
    ------
    clap.errors.ClapError
        An unknown name (with the nearest valid ones) or an invalid value (naming the option).

    Examples
    --------
    >>> opts = analyze_options(group="knowledge_type", n_boot=200, figures=False)
    >>> opts.overrides, opts.n_boot, opts.figures
    ({'group': 'knowledge_type'}, 200, False)
    >>> analyze_options(grup="knowledge_type")
    Traceback (most recent call last):
    ...
    clap.errors.ClapError: unknown analysis option 'grup' (did you mean group?); valid options: out_dir, dv, ...
    """
    if base is not None and not isinstance(base, AnalyzeOptions):
        raise ClapError(f"expected AnalyzeOptions (analyses.options), got {type(base).__name__} {base!r}; pass "
                        "single options by name, e.g. analyze(folder, out_dir=..., group=...)")
    own = AnalyzeOptions.model_fields
    for name in names:
        if name == "overrides" or (name not in own and name not in AnalysisOptions.model_fields):
            near = closest(name, option_names(), n=3)
            hint = f" (did you mean {' or '.join(near)}?)" if near else ""
            raise ClapError(f"unknown analysis option {name!r}{hint}; valid options: {', '.join(option_names())}")
    data = base.model_dump() if base is not None else {}
    data.pop("analysis", None)
    settings = {k: v for k, v in names.items() if k in own and v is not None}
    overrides = {k: v for k, v in names.items() if k not in own and v is not None}
    data.update(settings)
    data["overrides"] = {**(base.overrides if base is not None else {}), **overrides}
    data["analysis"] = settings.get("analysis", base.analysis if base is not None else None)
    try:
        return AnalyzeOptions(**data)
    except ValidationError as exc:
        raise ClapError(_message(exc)) from None


def resolve_options(meta: dict[str, Any], analysis: AnalysisOptions | dict[str, Any] | None = None,
                    **overrides: Any) -> AnalysisOptions:
    """The analysis section a run is analysed under: ``analysis`` if given, else the spec's ``analysis:`` section in
    run.json (``meta``), else the defaults; non-None ``overrides`` (command-line flags) replace single fields.

    Raises
    ------
    clap.errors.ClapError
        An invalid value, naming the option and the valid options.
    """
    if analysis is None:
        analysis = (meta.get("spec") or {}).get("analysis") or {}
    base = analysis.model_dump() if isinstance(analysis, AnalysisOptions) else dict(analysis)
    base.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return AnalysisOptions(**base)
    except ValidationError as exc:
        err = exc.errors()[0]
        field_name = ".".join(map(str, err["loc"])) or "analysis"
        raise ClapError(f"analysis option {field_name}: {err['msg'].removeprefix('Value error, ')} "
                        f"(valid options: {', '.join(AnalysisOptions.model_fields)})") from None


def _message(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(part) for part in err["loc"]).removeprefix("overrides.") or "options"
    return f"analysis option {where}: {err['msg'].removeprefix('Value error, ')} (got {err.get('input')!r})"
