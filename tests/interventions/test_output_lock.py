"""Two runs into one output folder: the second is refused naming the first; a finished run removes only its own
partial batches; a lock left by a dead process is taken over."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pandas as pd
import pytest

from clap.app.cli import main
from clap.errors import ClapError
from interventions.spec import StudySpec
from interventions.study import Study

from .conftest import PROBES

HOLDER = textwrap.dedent(
    """\
    import fcntl, json, os, socket, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode())
    print("locked", flush=True)
    sys.stdin.read()
    """
)


def _spec(**execution):
    return StudySpec.from_dict({
        "model": {"source": "m"}, "probes": {"inline": PROBES}, "sites": ["layers[*].resid_pre"],
        "positions": ["last"], "metrics": ["logit_diff"], "execution": {"progress": False, **execution},
    })


@pytest.fixture
def held_lock(tmp_path):
    """Another process holding ``<out>/.clap.lock`` (plain fcntl, as a second clap run would)."""
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out / ".clap.lock")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    yield out, holder.pid
    holder.stdin.close()
    holder.wait(timeout=30)


def test_second_run_into_a_locked_folder_is_refused_naming_the_holder(held_lock, tiny_gpt2, batches):
    out, pid = held_lock
    with pytest.raises(ClapError, match=rf"output folder {out} is in use by pid {pid} on host .* since"):
        Study(_spec(), model=tiny_gpt2).run(out)
    assert batches.calls == [] and not (out / ".partial").exists()


def test_cli_exits_2_with_one_line_before_loading_the_model(held_lock, tmp_path, monkeypatch, capsys):
    from interventions import resolved as study

    out, pid = held_lock
    monkeypatch.setattr(study, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    spec = tmp_path / "study.yaml"
    spec.write_text(f"model:\n  source: {tmp_path / 'nowhere'}\nprobes:\n  inline: {json.dumps(PROBES)}\n"
                    f"sites: [embed]\n")
    assert main(["patch", str(spec), "-o", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"is in use by pid {pid}" in err and "Traceback" not in err


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, tiny_gpt2):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True,
                          text=True)
    (out / ".clap.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": "h", "started": 0}))
    frame = Study(_spec(), model=tiny_gpt2).run(out)
    assert len(frame) == len(PROBES) * 3 and (out / "results.parquet").is_file()
    assert not (out / ".clap.lock").exists()


def test_finished_run_keeps_other_plans_partial_batches(tmp_path, tiny_gpt2, batches):
    out = tmp_path / "out"
    other = out / ".partial" / "0123456789abcdef"
    other.mkdir(parents=True)
    pd.DataFrame({"x": [1]}).to_parquet(other / "batch-00000.parquet")
    # an interrupted run of this spec leaves its own partial folder; the resumed run finishes and removes only it
    batches.reset(stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        Study(_spec(max_rows=4), model=tiny_gpt2).run(out)
    mine = [p for p in (out / ".partial").iterdir() if p != other]
    assert len(mine) == 1 and list(mine[0].glob("batch-*.parquet"))
    batches.reset()
    Study(_spec(max_rows=4), model=tiny_gpt2).run(out)
    assert not mine[0].exists()
    assert (other / "batch-00000.parquet").is_file()
