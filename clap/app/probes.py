"""``clap probes check``, registered at the roof so that ``--study`` reads both kinds of study the command line runs:
a ``clap patch`` spec and a ``clap run`` study file (several models, ``probes.files``, ``package:`` probe sets).

Why here: reading a study file is the roof's job (:mod:`clap.app.study_file`); the check itself lives in
:mod:`interventions.probe_check` (its command line in :mod:`interventions.probe_check_cli`) and takes the runs this
module reads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from clap.app.study_file import StudyFile
from interventions.probe_check_cli import StudyRun, register_probes
from interventions.probes import read_probe_specs
from interventions.spec import ProbeSetSpec, ProbeSpec


def study_file_runs(path: Path) -> tuple[list[StudyRun], list[str]]:
    """One :class:`StudyRun` per model of the study that exists before the run (a model the study fine-tunes is
    left out, with a note): the ``clap patch`` spec that model's patching stage runs, its probes inline so that
    several probe files need no merged copy, and the records with their own files and lines."""
    study = StudyFile.from_yaml(path)
    records = probe_records(study)
    probes = {"inline": [spec.model_dump(exclude_none=True) for _, spec in records],
              "multi_token": study.probes.multi_token}
    runs, notes = [], []
    entries = study.model_entries()
    for name, entry in entries.items():
        if entry.finetuned:
            notes.append(f"model {name!r} is trained by the study's `finetune:` stage, so it is not checked here; "
                         f"once trained, check it with `clap probes check --study` on a spec naming its folder")
            continue
        spec = study.patch_spec(entry.model_spec(study.located_source(entry)), overrides={"probes": probes})
        runs.append(StudyRun(name if len(entries) > 1 else "", spec, records))
    return runs, notes


def probe_records(study: StudyFile) -> list[tuple[str, ProbeSpec]]:
    """The study's probes in order, each with the file and line it comes from (``probes.files`` read one by one,
    as ``clap run`` concatenates them)."""
    probes = study.probes
    if probes.inline is not None:
        return read_probe_specs(probes, study.base_dir)
    paths, _ = study.probe_paths()  # the files clap run reads, refused as it refuses them
    return [record for path in paths
            for record in read_probe_specs(ProbeSetSpec(file=str(path.absolute())), study.base_dir)]


def register(subparsers: argparse._SubParsersAction) -> None:
    register_probes(subparsers, load_study=study_file_runs)

