"""The results contract between the patching engine and the analyses: file names, columns and dtypes, site kinds,
metric names, and the atomic reading and writing of a results folder.

Why one module: the engine writes what the analyses read, so every name both sides rely on is defined here once.
``interventions`` writes through :func:`write_results`; ``analyses`` reads through :func:`read_results`; neither
spells a file name or a column list of its own (``tests/test_layout.py`` checks that by grepping the tree).

A results folder holds two files:

``results.parquet``
    One row per (probe, site, position, operation, metric), columns:

    ========================  ===========================================================================
    column                    meaning
    ========================  ===========================================================================
    probe_id                  the probe's id
    <label columns>           one column per probe label (e.g. ``knowledge_type``); named in ``group_columns``
    site                      canonical site address (``layers.3.mlp_out``, ``layers.3.heads.7``, raw module path)
    site_kind                 one of :data:`SITE_KINDS`
    module                    the real module path patched
    layer, head               Int64 (NA outside the layer stack / for non-head sites)
    position                  Int64 token index in the unpadded target prompt (NA when several were patched)
    positions                 the position selection's canonical label (``last``, ``3``, ``all``,
                              ``match:Paris#2@clean``: text, occurrence and prompt of a substring match)
    token                     the target-prompt token(s) at the patched position(s)
    source_token              the source-prompt token(s) aligned with the patched positions (the activation that
                              replace/resample copy in)
    operation, direction      e.g. ``replace``, ``denoising``
    metric                    one of :data:`METRICS`
    clean, corrupted          the metric on the unpatched clean and corrupted runs
    patched                   the metric on the patched run
    recovery                  (patched - corrupted) / (clean - corrupted); NaN when |clean - corrupted| <= epsilon
    recovery_defined          False where the denominator was (near) zero
    trivial                   True where the patched value equals the source run's by construction: the source
                              activation replaces, at the answer position, the unembedding, the final norm or the
                              last block's output (recovery 1 when denoising, 0 when noising)
    n_patched_tokens          how many token positions the cell patched
    window                    Int64: how many sites the cell patched together: 1, a window's layer count
                              (``site`` is then ``layers.L.<kind>@wN``, ``layer`` its centre L), or a combined
                              group's size (``site`` ``a+b+...``, ``layer`` of the first)
    sample                    Int64 noise draw (0 .. samples - 1); NA in an average over samples
                              (``samples.parquet`` holds the per-sample rows when ``samples`` > 1). Every noise draw
                              is seeded by (seed, probe id, sample, site): a probe's corrupted row and its restored
                              rows share it
    effect                    patched - corrupted: with metric ``prob`` in a causal trace, the indirect effect
                              p(answer | corrupted + restored) - p(answer | corrupted)
    token_group               (causal traces only) ROME's token group of ``position``: first / middle / last
                              subject, first subsequent, further, last; ``before subject`` for tokens ROME leaves
                              out. One label per token: a one-token subject's reads ``first subject`` and a last
                              token right after the subject ``last`` (the token-group table counts both groups)
    source_model_clean,       (cross-model patching only; float) the metric on the *source* model's unpatched
    source_model_corrupted    run of the clean / corrupted prompt. ``clean``, ``corrupted`` and ``patched`` are
                              then the *target* model's runs, and ``recovery`` is (patched - target) /
                              (source - target): ``target`` the target model on the target prompt (``corrupted``
                              when denoising, ``clean`` when noising), ``source`` the source model on the source
                              prompt (``source_model_clean`` when denoising, ``source_model_corrupted`` when
                              noising); 1 = the source model's behaviour transferred. ``kl`` is each model's KL to
                              its own clean run, so its recovery is NaN across models
    ========================  ===========================================================================

    With ``samples`` > 1 the results hold, per cell and metric, the mean over samples of ``clean``, ``corrupted``
    and ``patched`` (ROME averages probabilities over noise draws), and ``recovery`` and ``effect`` recomputed from
    those means. ``run.json`` then records the noise stds used (``noise``).

``samples.parquet``
    Only with ``samples`` > 1: the same columns, one row per noise draw (:func:`read_samples`; the analyses and the
    trace tables report the spread over draws from it).

``run.json``
    The sidecar: a JSON object with at least :data:`REQUIRED_SIDECAR_KEYS` (the resolved spec, the model's
    identity and weight fingerprint, package versions, the seed, the label columns, the creation time, the probes);
    a cross-model run adds ``source_model`` (the source model's identity and weight fingerprint).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clap.errors import ClapError, closest

if TYPE_CHECKING:  # pandas is imported where a frame is read, so the command line starts without it
    import pandas as pd

RESULTS_FILE = "results.parquet"
SIDECAR_FILE = "run.json"
SAMPLES_FILE = "samples.parquet"
#: beside an additivity run's results: which layers each joint cell patched, per probe (interventions.derived)
DESIGN_FILE = "design.csv"

#: Site kinds in forward-execution order; ``module`` is any raw module address.
SITE_KINDS: tuple[str, ...] = (
    "embed",
    "resid_pre",
    "attn_out",
    "head",
    "mlp_out",
    "resid_post",
    "block_out",
    "final_norm",
    "unembed",
    "module",
)

#: Metrics the engine computes from last-position logits, in the order of its ``[rows, len(METRICS)]`` tensor.
METRICS: tuple[str, ...] = ("logit_diff", "logit", "prob", "logprob", "kl")

#: Column -> kind of values. ``str`` columns are read as plain object strings, ``Int64`` as pandas' nullable
#: integers (NA outside the layer stack), ``float`` as float64 and ``bool`` as bool.
REQUIRED_COLUMNS: dict[str, str] = {
    "probe_id": "str",
    "site": "str",
    "site_kind": "str",
    "layer": "Int64",
    "head": "Int64",
    "position": "Int64",
    "positions": "str",
    "token": "str",
    "operation": "str",
    "direction": "str",
    "metric": "str",
    "clean": "float",
    "corrupted": "float",
    "patched": "float",
    "recovery": "float",
    "recovery_defined": "bool",
    "trivial": "bool",
}

#: Columns only some kinds of study produce (windows, noise samples, causal traces, cross-model patching, attribution
#: patching), with their kinds. ``approximate`` is true on rows estimated by attribution patching (operation
#: ``attribution``: first order, not measured) and false on the exact rows beside them; a study without attribution
#: rows has no such column.
OPTIONAL_COLUMNS: dict[str, str] = {"window": "Int64", "sample": "Int64", "effect": "float", "token_group": "str",
                                    "source_model_clean": "float", "source_model_corrupted": "float",
                                    "approximate": "bool"}

#: The values of the ``token_group`` column (causal traces): ROME's six token groups, in prompt order, and the label
#: of a token before the subject, which is in no ROME group (ROME's averages leave these tokens out).
TOKEN_GROUPS = ("first subject", "middle subject", "last subject", "first subsequent", "further", "last")
BEFORE_SUBJECT = "before subject"

REQUIRED_SIDECAR_KEYS: tuple[str, ...] = ("spec", "model", "versions", "seed", "group_columns", "created", "n_probes")

_KIND_WORDS = {"str": "text", "Int64": "integers or missing values", "float": "numbers", "bool": "true/false values"}


# --------------------------------------------------------------------------------------------- atomic files
def current_umask() -> int:
    """The process's umask, read without changing it where the kernel reports it (``/proc/self/status``, Linux);
    elsewhere set and restored at once (``os.umask`` has no read-only form)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary name beside ``path``, then rename it into place.

    Why: a reader (or a crash) never sees half a file; the rename is atomic on one file system, and the
    temporary is removed when ``write`` fails. The file gets the permissions of a plain ``open()`` under the
    process's umask (0644 under umask 022, 0664 under 002), not the 0600 of the temporary name, so reports can be
    shared from a group folder or served.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600: give the file the mode open() would
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically (values JSON cannot hold are written as text)."""
    return atomic_write_text(path, json.dumps(data, indent=2, default=str))


def atomic_write_frame(path: str | Path, frame: pd.DataFrame) -> Path:
    """Write ``frame`` atomically as Parquet (``.parquet``) or CSV (anything else), without the index."""
    path = Path(path)
    if path.suffix == ".parquet":
        return atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


# --------------------------------------------------------------------------------------------- the results folder
def results_path(results_dir: str | Path) -> Path:
    """``RESULTS_DIR/results.parquet``."""
    return Path(results_dir) / RESULTS_FILE


def sidecar_path(results_dir: str | Path) -> Path:
    """``RESULTS_DIR/run.json``."""
    return Path(results_dir) / SIDECAR_FILE


def has_results(results_dir: str | Path) -> bool:
    """Whether a folder holds a complete results pair (both files are written last, by rename)."""
    return results_path(results_dir).is_file() and sidecar_path(results_dir).is_file()


def write_results(results_dir: str | Path, frame: pd.DataFrame, sidecar: dict[str, Any]) -> Path:
    """Write ``results.parquet`` and ``run.json`` atomically (temporary names, then rename); ``created`` is
    stamped into the sidecar unless given. Returns the Parquet path."""
    root = Path(results_dir)
    sidecar = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **sidecar}
    atomic_write_frame(results_path(root), frame)
    atomic_write_json(sidecar_path(root), sidecar)
    return results_path(root)


def read_results(results_dir: str | Path, *, validate: bool = True) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read a results folder: ``(frame, sidecar)``, checked and with the documented dtypes.

    Raises :class:`~clap.errors.ClapError` naming the file and what is wrong when either file is missing or
    malformed (``validate=False`` skips the column checks, for the engine's own round trips).
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise ClapError(f"{root}: results directory not found (expected a folder with {RESULTS_FILE} and "
                        f"{SIDECAR_FILE})")
    meta = read_sidecar(sidecar_path(root))
    path = results_path(root)
    if not path.is_file():
        raise ClapError(f"{path}: results file not found (the patching run writes {RESULTS_FILE} beside "
                        f"{SIDECAR_FILE})")
    import pandas as pd

    try:
        data = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several unrelated types for a corrupt file
        raise ClapError(f"{path}: not a readable Parquet file ({exc})") from exc
    if validate:
        data = validate_results(data, source=str(path), group_columns=meta["group_columns"])
        check_layers(data, meta, str(path))
    return data, meta


def samples_path(results_dir: str | Path) -> Path:
    """``RESULTS_DIR/samples.parquet`` (only with ``samples`` > 1)."""
    return Path(results_dir) / SAMPLES_FILE


def read_samples(results_dir: str | Path) -> pd.DataFrame | None:
    """The per-noise-draw rows of a results folder (``samples.parquet``), checked and typed like the results, or
    None when the study drew noise once (no such file). Every row has an integer ``sample``.

    A ``samples.parquet`` is read only when ``run.json`` records several draws (its spec's or its noise's
    ``samples``): one left in the folder by an earlier run (a trace, then a plain run into the same ``-o``) belongs
    to other results and is ignored, with a warning, instead of feeding their noise tables."""
    root = Path(results_dir)
    path = samples_path(root)
    if not path.is_file():
        return None
    meta = read_sidecar(sidecar_path(root))
    recorded = [(meta.get(key) or {}).get("samples") for key in ("spec", "noise")]
    drawn = max((n for n in recorded if isinstance(n, int) and not isinstance(n, bool)), default=1)
    if drawn <= 1:
        import warnings

        warnings.warn(f"{path} is ignored: {SIDECAR_FILE} records a run with samples: {drawn}, so the file is left "
                      f"from an earlier run in this folder", stacklevel=2)
        return None
    import pandas as pd

    try:
        data = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several unrelated types for a corrupt file
        raise ClapError(f"{path}: not a readable Parquet file ({exc})") from exc
    data = validate_results(data, source=str(path), group_columns=meta["group_columns"])
    if "sample" not in data.columns or data["sample"].isna().any():
        raise ClapError(f"{path}: every row of {SAMPLES_FILE} names its noise draw in column 'sample'")
    return data


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """Read and check ``run.json``: a JSON object holding :data:`REQUIRED_SIDECAR_KEYS`."""
    path = Path(path)
    if not path.is_file():
        raise ClapError(f"{path}: sidecar not found (the patching run writes {SIDECAR_FILE} beside {RESULTS_FILE})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ClapError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from exc
    except UnicodeDecodeError as exc:
        raise ClapError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    if not isinstance(meta, dict):
        raise ClapError(f"{path}: expected a JSON object with keys {', '.join(REQUIRED_SIDECAR_KEYS)}")
    missing = [k for k in REQUIRED_SIDECAR_KEYS if k not in meta]
    if missing:
        raise ClapError(f"{path}: missing key(s) {', '.join(missing)}; expected {', '.join(REQUIRED_SIDECAR_KEYS)}")
    groups = meta["group_columns"]
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise ClapError(f"{path}: 'group_columns' must be a list of column names, got {groups!r}")
    for key in ("spec", "model", "versions"):
        if not isinstance(meta[key], dict):
            raise ClapError(f"{path}: {key!r} must be a JSON object, got {type(meta[key]).__name__}")
    return meta


# --------------------------------------------------------------------------------------------- columns and dtypes
def typed_frame(frame: pd.DataFrame, group_columns: Iterable[str]) -> pd.DataFrame:
    """The contract's dtypes (nullable Int64 indices, float64 values) and column order: probe id, labels, rest."""
    frame = frame.copy()
    for column, kind in {**REQUIRED_COLUMNS, **OPTIONAL_COLUMNS}.items():
        if column in frame.columns and kind in ("Int64", "float"):
            frame[column] = frame[column].astype("Int64" if kind == "Int64" else "float64")
    ordered = ["probe_id", *group_columns]
    return frame[ordered + [c for c in frame.columns if c not in ordered]]


def validate_results(
    data: pd.DataFrame, source: str = "results", group_columns: list[str] | tuple[str, ...] = ()
) -> pd.DataFrame:
    """Check the columns of a results frame and return a copy with the documented dtypes.

    ``source`` names the file in error messages. Integer-like columns become nullable ``Int64``; string columns
    become plain Python strings (so comparisons and grouping behave the same whatever Parquet stored).

    Parameters
    ----------
    data : pandas.DataFrame
        A results table.
    source : str, default "results"
        The name error messages give it (usually the file it came from).
    group_columns : sequence of str
        Label columns that must be present and have no missing labels.

    Returns
    -------
    pandas.DataFrame
        A copy with the dtypes of :data:`REQUIRED_COLUMNS`.

    Raises
    ------
    clap.errors.ClapError
        A missing column, a value of the wrong kind, a missing group label or an unknown site kind.

    Examples
    --------
    >>> from analyses import validate_results
    >>> from analyses.synthetic import make_results
    >>> data = make_results(n_probes=4, n_layers=3, site_kinds=("mlp_out",), metrics=("logit_diff",))
    >>> checked = validate_results(data, group_columns=["knowledge_type"])
    >>> str(checked["layer"].dtype), checked.shape == data.shape
    ('Int64', True)
    >>> validate_results(data.drop(columns=["recovery"]), source="x.parquet")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    clap.errors.ClapError: x.parquet: missing column(s) recovery; a results table needs probe_id, ...
    """
    expected = list(REQUIRED_COLUMNS) + list(group_columns)
    missing = [c for c in expected if c not in data.columns]
    if missing:
        raise ClapError(
            f"{source}: missing column(s) {', '.join(missing)}; a results table needs "
            f"{', '.join(expected)} (group columns come from {SIDECAR_FILE} 'group_columns')"
        )
    out = data.copy()
    for col, kind in REQUIRED_COLUMNS.items():
        try:
            out[col] = _coerce(out[col], kind)
        except (TypeError, ValueError) as exc:
            raise ClapError(f"{source}: column {col!r} must hold {_KIND_WORDS[kind]} ({exc})") from exc
    for col in group_columns:
        if out[col].isna().any():
            raise ClapError(f"{source}: group column {col!r} has missing labels; every probe needs a group")
        out[col] = out[col].astype(str).astype(object)
    unknown = sorted(set(out["site_kind"]) - set(SITE_KINDS))
    if unknown:
        raise ClapError(f"{source}: column 'site_kind' has unknown value(s) {', '.join(unknown)}; expected one of "
                        f"{', '.join(SITE_KINDS)}")
    _check_values(out, source)
    return out


def _check_values(data: pd.DataFrame, source: str) -> None:
    """Values no engine run writes, which the analyses would otherwise read as data: rows without a probe id, metric
    names other than :data:`METRICS` (a typo would make a slice of its own), negative layers."""
    missing = data["probe_id"].isna() | (data["probe_id"].astype(str).str.strip() == "")
    if missing.any():
        rows = [int(i) for i in data.index[missing.to_numpy()][:5]]
        raise ClapError(f"{source}: {int(missing.sum())} row(s) have no probe_id (rows {', '.join(map(str, rows))}"
                        f"{', ...' if missing.sum() > 5 else ''}); every row belongs to a probe")
    unknown = sorted({str(m) for m in data["metric"].dropna()} - set(METRICS))
    if unknown:
        hints = [f"{m!r} (did you mean {', '.join(map(repr, closest(m, METRICS)))}?)" if closest(m, METRICS)
                 else repr(m) for m in unknown]
        raise ClapError(f"{source}: column 'metric' has unknown value(s) {', '.join(hints)}; the metrics are "
                        f"{', '.join(METRICS)}")
    layers = data["layer"].dropna()
    negative = sorted({int(v) for v in layers[layers < 0]})
    if negative:
        raise ClapError(f"{source}: column 'layer' holds negative layer(s) {', '.join(map(str, negative[:5]))}; "
                        "layers count from 0")


def check_layers(data: pd.DataFrame, meta: dict[str, Any], source: str) -> None:
    """Every layer lies inside the model that ``run.json`` records (``model.n_layers``, when it records one)."""
    n_layers = meta.get("model", {}).get("n_layers")
    if not isinstance(n_layers, int) or isinstance(n_layers, bool) or n_layers <= 0:
        return
    layers = data["layer"].dropna()
    beyond = sorted({int(v) for v in layers[layers >= n_layers]})
    if beyond:
        raise ClapError(f"{source}: column 'layer' holds layer(s) {', '.join(map(str, beyond[:5]))}"
                        f"{', ...' if len(beyond) > 5 else ''} but {SIDECAR_FILE} records a model of {n_layers} "
                        f"layers (0-{n_layers - 1})")


def _coerce(series: pd.Series, kind: str) -> pd.Series:
    import pandas as pd

    if kind == "str":
        present = series.notna()
        out = series.astype(object).where(present, None)
        out[present] = out[present].astype(str)
        return out
    if kind == "Int64":
        if pd.api.types.is_float_dtype(series):
            values = series.dropna()
            if not (values == values.round()).all():
                raise ValueError("found non-integer values")
        return series.astype("Int64")
    if kind == "float":
        return pd.to_numeric(series, errors="raise").astype("float64")
    if kind == "bool":
        if series.isna().any():
            raise ValueError("found missing values")
        return series.astype(bool)
    raise AssertionError(kind)
