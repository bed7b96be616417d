"""Which checkpoint a rerun resumes from: the newest COMPLETE one; incomplete ones are reported and set aside.

Why not ``transformers.trainer_utils.get_last_checkpoint``: it returns the highest-numbered ``checkpoint-N`` folder
whatever it holds. A run killed while the Trainer was writing a checkpoint leaves that folder empty or half written,
and every rerun then fails on it (or, with a truncated weights file, on a torch/safetensors error far from the
cause). The checks mirror what ``Trainer.train(resume_from_checkpoint=...)`` loads: the trainer state, the model
or adapter weights, and the optimizer and scheduler state must be there; and every file of the folder that a resume
may read must be whole: each JSON file parses (``config.json``, ``adapter_config.json``, ...), each torch file
(``rng_state.pth``, ``optimizer.pt``, ``scaler.pt``, ...) is a zip archive whose every member passes its CRC, each
safetensors file has a readable header covering its size. A folder failing any of them is passed over (and moved
aside) like a half-written one, so a rerun resumes from the previous complete checkpoint instead of failing on
every rerun.
"""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

#: Weight files the Trainer can resume from, in its order of preference (full model, then LoRA adapter).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class SkippedCheckpoint:
    """A checkpoint folder that cannot be resumed from, why, and where it was moved (``None``: not moved yet)."""

    name: str
    reason: str
    moved_to: str | None = None


def checkpoint_step(path: Path) -> int | None:
    match = _CHECKPOINT.match(path.name)
    return int(match.group(1)) if match else None


def _safetensors_problem(path: Path) -> str | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            if not list(handle.keys()):
                return f"{path.name} holds no tensors"
    except (SafetensorError, OSError) as exc:
        return f"{path.name} is unreadable ({str(exc).splitlines()[0]})"
    return None


def _torch_file_problem(path: Path) -> str | None:
    """``torch.save`` writes a zip archive whose directory is at the end: a truncated file has none, and a member
    whose bytes were damaged fails its CRC."""
    try:
        with zipfile.ZipFile(path) as archive:
            if not archive.namelist():
                return f"{path.name} is empty"
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return f"{path.name} is truncated or not a torch file"
    if damaged is not None:
        return f"{path.name} is damaged ({damaged} fails its checksum)"
    return None


def _json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        return f"{path.name} is unreadable ({str(exc).splitlines()[0][:80]})"
    return None


def _file_problem(path: Path) -> str | None:
    if not path.is_file():
        return f"{path.name} missing"
    if path.stat().st_size == 0:
        return f"{path.name} is empty (0 bytes)"
    if path.suffix == ".safetensors":
        return _safetensors_problem(path)
    if path.suffix in (".pt", ".bin", ".pth"):
        return _torch_file_problem(path)
    if path.suffix == ".json":
        return _json_problem(path)
    return None


def _any_file_problem(folder: Path, checked: set[str]) -> str | None:
    """The first file of ``folder`` (any depth, sorted; ``checked`` names skipped) that a resume may read and that
    is not whole."""
    for path in sorted(folder.rglob("*")):
        if path.name in checked and path.parent == folder:
            continue
        if path.is_file() and path.suffix in (".json", ".pt", ".bin", ".pth", ".safetensors"):
            problem = _file_problem(path)
            if problem:
                return problem if path.parent == folder else f"{path.relative_to(folder).as_posix()}: {problem}"
    return None


def _weights_problem(folder: Path) -> str | None:
    present = [name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not present:
        return f"no model weights ({' / '.join(WEIGHT_FILES)})"
    name = present[0]
    if name.endswith(".index.json"):  # sharded weights: the index and every shard it names
        try:
            shards = sorted(set(json.loads((folder / name).read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, OSError):
            return f"{name} is unreadable"
        return next((p for p in (_file_problem(folder / shard) for shard in shards) if p), None)
    return _file_problem(folder / name)


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be resumed from, or ``None`` when it is complete."""
    if not folder.is_dir():
        return "not a folder"
    if not any(folder.iterdir()):
        return "empty folder"
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "trainer_state.json missing (written last: the save was interrupted)"
    try:
        step = json.loads(state.read_text(encoding="utf-8"))["global_step"]
    except (ValueError, KeyError, TypeError, OSError):
        return "trainer_state.json is unreadable"
    if step != checkpoint_step(folder):
        return f"trainer_state.json is for step {step}"
    checked = {"trainer_state.json", *WEIGHT_FILES, "optimizer.pt", "scheduler.pt"}
    for problem in (_weights_problem(folder), _file_problem(folder / "optimizer.pt"),
                    _file_problem(folder / "scheduler.pt")):
        if problem:
            return problem
    return _any_file_problem(folder, checked)


def find_resumable(checkpoints: Path) -> tuple[Path | None, list[SkippedCheckpoint]]:
    """The newest complete checkpoint under ``checkpoints`` and the newer incomplete ones passed over.

    Older incomplete folders (below the one resumed from) are left alone: the Trainer's rotation never looks
    at them as resume points, and they are not in the way of the steps still to come.
    """
    if not checkpoints.is_dir():
        return None, []
    folders = sorted((p for p in checkpoints.iterdir() if checkpoint_step(p) is not None),
                     key=checkpoint_step, reverse=True)
    skipped: list[SkippedCheckpoint] = []
    for folder in folders:
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, skipped
        skipped.append(SkippedCheckpoint(folder.name, problem))
    return None, skipped


def set_aside(checkpoints: Path, skipped: list[SkippedCheckpoint], destination: Path) -> list[SkippedCheckpoint]:
    """Move the skipped folders to ``destination`` (kept for inspection, never deleted).

    Why move them: the resumed run will save the same step numbers again, and the Trainer would write into the
    broken folder (or rotate it away as if it were a real checkpoint). Outside ``checkpoints/`` they are invisible
    to it.
    """
    moved = []
    for entry in skipped:
        source = checkpoints / entry.name
        if not source.exists():
            moved.append(entry)
            continue
        destination.mkdir(parents=True, exist_ok=True)
        target = destination / entry.name
        n = 1
        while target.exists():
            n += 1
            target = destination / f"{entry.name}.{n}"
        shutil.move(str(source), str(target))
        moved.append(SkippedCheckpoint(entry.name, entry.reason, str(target)))
    return moved


__all__ = ["SkippedCheckpoint", "checkpoint_problem", "find_resumable", "set_aside"]
