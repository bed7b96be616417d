"""Bad output paths and full disks end every command with one line naming the path, before work starts, and leave
nothing torn; an analysis folder keeps no files of slices the results no longer hold (clap/outputs.py)."""

from __future__ import annotations

import errno
import json
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from analyses.synthetic import write_synthetic
from clap.app.cli import main
from clap.errors import ClapError
from clap.outputs import os_error_text, prepare_output_dir, prepare_output_file, prune_outputs

SMALL = dict(n_probes=6, n_layers=3, site_kinds=("resid_pre",), metrics=("logit_diff",), tokens=("a", " b"))


def one_line(capsys, argv: list) -> str:
    """Run ``clap ARGV``; it must fail with exit code 2 and one line on stderr (no traceback)."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") == 0 and err.startswith("clap: error: "), err
    return err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return write_synthetic(root / "a", seed=1, **SMALL), write_synthetic(root / "b", seed=2, **SMALL)


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "taken.txt"
    path.write_text("not a folder")
    return path


@pytest.fixture
def read_only(monkeypatch):
    """Every folder refuses new files. Tests run as root, where permission bits never deny a write."""

    def denied(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", denied)


def _commands(runs, out):
    a, b = runs
    return {
        "analyze": ["analyze", a, "-o", out, "--no-figures", "--n-boot", "100"],
        "report": ["report", a, "-o", out, "--no-figures", "--n-boot", "100"],
        "compare": ["compare", a, b, "-o", out, "--no-figures"],
    }


@pytest.mark.parametrize("command", ["analyze", "report", "compare"])
def test_output_that_is_a_file_is_one_line(command, runs, a_file, capsys):
    err = one_line(capsys, _commands(runs, a_file)[command])
    assert f"output folder {a_file} is an existing file" in err
    err = one_line(capsys, _commands(runs, a_file / "sub")[command])
    assert f"output folder {a_file / 'sub'} cannot be created: {a_file} is a file" in err
    assert a_file.read_text() == "not a folder"


@pytest.mark.parametrize("command", ["analyze", "report", "compare"])
def test_read_only_output_is_one_line(command, runs, tmp_path, read_only, capsys):
    err = one_line(capsys, _commands(runs, tmp_path / "out")[command])
    assert f"output folder {tmp_path / 'out'} is not writable: Read-only file system" in err
    assert not list((tmp_path / "out").iterdir())  # nothing written


def _study(tmp_path: Path) -> Path:
    study = tmp_path / "study.yaml"
    study.write_text("name: s\nmodel: {source: ./no-such-model}\nprobes:\n  inline:\n"
                     "    - {id: a, clean: 'The capital of France is', corrupted: 'The capital of Spain is',"
                     " answer: ' Paris', wrong: ' Madrid'}\nsites: ['layers[0].resid_pre']\n")
    return study


def test_run_output_that_is_a_file_or_read_only_is_one_line(tmp_path, a_file, capsys, monkeypatch):
    err = one_line(capsys, ["run", _study(tmp_path), "-o", a_file])
    assert f"output folder {a_file} is an existing file" in err
    monkeypatch.setattr(tempfile, "TemporaryFile", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "no")))
    err = one_line(capsys, ["run", _study(tmp_path), "-o", tmp_path / "out"])
    assert f"output folder {tmp_path / 'out'} is not writable" in err


def test_probes_check_outputs_are_checked_before_the_model_loads(tmp_path, capsys):
    probes = tmp_path / "probes.jsonl"
    probes.write_text(json.dumps({"id": "a", "clean": "A b", "corrupted": "C b", "answer": " x", "wrong": " y"})
                      + "\n")
    folder = tmp_path / "a-folder"
    folder.mkdir()
    for option in ("--write-valid", "-o"):  # the model does not exist: its error would come later
        err = one_line(capsys, ["probes", "check", probes, "--model", tmp_path / "no-model", option, folder])
        assert f"{option} {folder} is a folder; give a file name" in err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = one_line(capsys, ["probes", "check", probes, "--model", tmp_path / "no-model", "--write-valid",
                            blocker / "valid.jsonl"])
    assert f"cannot be created: {blocker} is a file" in err


def test_os_errors_at_the_command_line_are_one_line(runs, tmp_path, monkeypatch, capsys):
    """Whatever write a disk-full error hits, the command line prints the file and the reason, not a traceback."""
    import analyses.pipeline

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "units.csv"))

    monkeypatch.setattr(analyses.pipeline, "atomic_write_frame", full)
    err = one_line(capsys, ["analyze", runs[0], "-o", tmp_path / "out", "--no-figures"])
    assert err == (f"clap: error: {tmp_path / 'out' / 'units.csv'}: No space left on device (free some space and "
                   "rerun)")
    assert os_error_text(OSError(errno.EACCES, "Permission denied")) == "Permission denied (check the folder's " \
                                                                        "permissions)"


def test_prepare_helpers(tmp_path):
    assert prepare_output_dir(tmp_path / "new" / "deep").is_dir()
    with pytest.raises(ClapError, match="is a folder; give a file name"):
        prepare_output_file(tmp_path / "new", what="--write-valid")
    assert prepare_output_file(tmp_path / "other" / "x.csv", what="-o") == tmp_path / "other" / "x.csv"
    assert (tmp_path / "other").is_dir() and not list((tmp_path / "other").iterdir())


# ------------------------------------------------------------------------------------------------- stale files
def test_prune_outputs_removes_only_what_the_last_run_wrote_and_this_one_did_not(tmp_path):
    out = tmp_path / "out"
    (out / "figures" / "old").mkdir(parents=True)
    for name in ("a.csv", "b.csv", "figures/old/x.png", "figures/keep.png", "mine.txt"):
        (out / name).write_text(name)
    assert prune_outputs(out, [out / "a.csv", out / "b.csv", out / "figures/old/x.png", out / "figures/keep.png"],
                         ".m.json") == []
    removed = prune_outputs(out, [out / "a.csv", out / "figures/keep.png"], ".m.json")
    assert sorted(p.relative_to(out).as_posix() for p in removed) == ["b.csv", "figures/old/x.png"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        ".m.json", "a.csv", "figures/keep.png", "mine.txt"]  # the user's file stays; the emptied folder is gone
    assert json.loads((out / ".m.json").read_text())["files"] == ["a.csv", "figures/keep.png"]
    (out / ".m.json").write_text(json.dumps({"files": ["../outside.txt", "/etc/hostname", "figures"]}))
    (tmp_path / "outside.txt").write_text("never touched")
    assert prune_outputs(out, [], ".m.json") == []
    assert (tmp_path / "outside.txt").exists() and (out / "figures").is_dir()


def test_analyze_drops_files_of_slices_no_longer_in_the_results(tmp_path):
    from analyses.pipeline import analyze

    run = write_synthetic(tmp_path / "run", n_probes=6, n_layers=3, site_kinds=("resid_pre", "mlp_out"),
                          metrics=("logit_diff", "prob"), tokens=("a", " b"), seed=4)
    first = analyze(run, n_boot=100)
    mine = first.out_dir / "notes.txt"
    mine.write_text("the user's own file")
    prob_files = {p for p in first.out_dir.rglob("*") if p.is_file() and "prob" in p.name.replace("probe", "")}
    assert prob_files, "the first analysis draws figures of the prob slice"
    data = pd.read_parquet(run / "results.parquet")
    data[data.metric != "prob"].to_parquet(run / "results.parquet", index=False)
    second = analyze(run, n_boot=100)
    on_disk = {p for p in second.out_dir.rglob("*") if p.is_file()}
    assert not any(p.exists() for p in prob_files)
    assert on_disk == {Path(p) for p in second.files} | {mine, second.out_dir / ".clap-analyze-files.json"}
    assert mine.read_text() == "the user's own file"
