"""Statistics passes: what a plan needs measured before its batches can be compiled.

Why a module of its own: every operation declares what it needs (:mod:`interventions.operations` ``needs``), and
these passes produce it once per study, before batching: site widths, probe-set means (``mean``), embedding stds
(``noise`` relative to the embeddings or the selected tokens, recorded in run.json), steering vectors (a file or the
mean difference of two prompt sets) and, for cross-model patching, the source model's activations and baselines.
Each is a capture (one batched trace, :meth:`interventions.executor.Executor.capture`), never a patched run.
"""

from __future__ import annotations

from pathlib import Path

import torch

from clap.errors import ClapError
from clap.models import LoadedModel
from interventions import full_traces
from interventions.alignment import left_pad, unpad
from interventions.executor import Executor
from interventions.measurements import Measurements
from interventions.plan import Batch, Plan
from interventions.resolved import ResolvedStudy
from interventions.sites import Site


class MeasurementPasses:
    """The measuring passes of one resolved study, run through its executor. A cross-model study's source-model
    baselines are left in :attr:`source_metrics` (``(probe, role) -> metrics``)."""

    def __init__(self, study: ResolvedStudy, executor: Executor):
        self.study = study
        self.executor = executor
        self.source_metrics: dict[tuple[int, str], torch.Tensor] = {}

    def constants(self, plan: Plan) -> Measurements:
        """Widths of every site; the measuring passes the plan's operations need (:mod:`operations` ``needs``):
        probe-set means, embedding stds for noise, steering vectors."""
        from clap.architectures import architecture_of
        from interventions import operations

        model = self.study.model
        widths = {}
        probe_ids = plan.probes[0].clean_ids
        cell_ops, baseline_ops = self.study.cell_operations, self.study.baseline_operations
        needs = set().union(*(operations.get(op.name).needs for op in cell_ops + baseline_ops))
        keys = list(dict.fromkeys(site.access_key for site in plan.sites))
        ids = torch.tensor([probe_ids])
        acts = self.executor.capture(ids, torch.ones_like(ids), keys)
        shape = {key: act.shape[-1] for key, act in zip(keys, acts, strict=True)}
        for site in plan.sites:
            width = shape[site.access_key]
            widths[site.name] = width // site.n_heads if site.kind == "head" else width
        constants = Measurements(widths=widths, seed=self.study.spec.seed)
        if "mean" in needs:
            constants.means = self._means(plan, keys, [p.prompt_ids(plan.source) for p in plan.probes])
        noise_ops = [op for op in cell_ops + baseline_ops if op.name == "noise"]
        if any(op.relative_to != "absolute" for op in noise_ops):
            embed_key = (architecture_of(model.hf).embed, "output")
            prompts = [p.prompt_ids(r) for p in plan.probes for r in ("clean", "corrupted")]
            embeddings = self.gather([embed_key], prompts)[0]
            if any(op.relative_to == "embedding_std" for op in noise_ops):
                constants.embedding_std = float(torch.cat(embeddings).std())
            if any(op.relative_to == "selected_std" for op in noise_ops):
                constants.selected_std = self._selected_std(plan, embeddings)
        if "vector" in needs:
            constants.vectors = self._vectors(plan, cell_ops + baseline_ops, widths)
        if self.study.source_model is not None:
            self._cross_model(plan, keys, shape, constants)
        return constants

    def _cross_model(self, plan: Plan, keys: list[tuple[str, str]], widths: dict[tuple[str, str], int],
                     constants: Measurements) -> None:
        """The source model's part of a cross-model study, before any batch: its activations on every probe's source
        prompt at every patched module access (``replace`` / ``interpolate`` compile to them), and its own metrics
        on both prompts (``source_model_clean`` / ``_corrupted``: the recovery's 1)."""
        source = self.study.source_model
        assert source is not None
        step = max(2, self.study.spec.execution.max_rows or 64)
        prompts = [p.prompt_ids(plan.source) for p in plan.probes]
        acts: dict[tuple[str, str], list[torch.Tensor]] = {key: [] for key in keys}
        for start in range(0, len(prompts), step):
            for key, per in zip(keys, self.gather(keys, prompts[start:start + step], source), strict=True):
                acts[key] += per
        for key in keys:
            if acts[key][0].shape[-1] != widths[key]:
                raise ClapError(f"{self.study.spec.where(('source_model',))}: {key[0]} ({key[1]}) is "
                                f"{acts[key][0].shape[-1]} wide in the source model but {widths[key]} in the target")
        constants.source_acts = acts
        rows = [(p, role) for p in range(len(plan.probes)) for role in ("clean", "corrupted")]
        metrics: dict[tuple[int, str], torch.Tensor] = {}
        unembed = self.study.unembed_module
        for start in range(0, len(rows), step - step % 2):
            chunk = rows[start:start + step - step % 2]
            batch = baseline_batch(plan, chunk, source.tokenizer.pad_token_id)
            values = full_traces.run_batch(source.nn, batch, remote=self.study.spec.execution.remote,
                                       unembed_module=unembed)
            metrics.update({row: values[i] for i, row in enumerate(chunk)})
        self.source_metrics = metrics

    def _selected_std(self, plan: Plan, embeddings: list[torch.Tensor]) -> float:
        """Std (over all elements) of the token embeddings of the tokens that ``selected_std`` noise acts on, over
        the probe set (each probe's target prompt once): ROME's noise unit over the subjects' tokens."""
        rows = []
        for p_index in range(len(plan.probes)):
            target = embeddings[2 * p_index + (0 if plan.target == "clean" else 1)]
            chosen = set()
            for edit in plan.baseline.get(p_index, ()):
                if edit.operation.name == "noise" and edit.operation.relative_to == "selected_std":
                    chosen.update(edit.indices)
            for cell in plan.cells:
                if cell.probe == p_index and cell.operation.name == "noise" and \
                        cell.operation.relative_to == "selected_std":
                    chosen.update(cell.positions.indices)
            rows += [target[i] for i in sorted(chosen)]
        if not rows:
            raise ClapError("noise relative_to: selected_std selects no token in any probe")
        return float(torch.stack(rows).std())

    def _vectors(self, plan: Plan, ops: list, widths: dict[str, int]) -> dict[tuple[str, str], torch.Tensor]:
        """Steering vectors per (operation, site): from a .pt/.npy file, or the mean difference of the last-token
        activations of two prompt sets at the site (one measuring pass per set)."""
        tokenizer = self.study.model.tokenizer
        out = {}
        for op in ops:
            if op.name != "steer":
                continue
            key = op.model_dump_json()
            if op.vector is not None:
                vector = load_vector(op.vector, self.study.spec.base_dir).reshape(-1)
                for site in _sites_using(plan, key):  # only where this steer acts: other groups' sites may differ
                    if vector.numel() != widths[site.name]:
                        raise ClapError(f"steering vector {op.vector}: {vector.numel()} values, but site {site.name} "
                                        f"is {widths[site.name]} wide")
                    out[(key, site.name)] = vector
                continue
            sets = [[tokenizer(t)["input_ids"] for t in prompts] for prompts in (op.vector_from.plus,
                                                                                op.vector_from.minus)]
            site_keys = list(dict.fromkeys(site.access_key for site in plan.sites))
            means = []
            for prompts in sets:
                acts = self.gather(site_keys, prompts)
                means.append({k: torch.stack([a[-1] for a in per]).double().mean(0)
                              for k, per in zip(site_keys, acts, strict=True)})
            for site in plan.sites:
                diff = (means[0][site.access_key] - means[1][site.access_key]).float()
                if site.kind == "head":
                    diff = diff.view(site.n_heads, -1)[site.head]
                out[(key, site.name)] = diff
        return out

    def gather(self, keys: list[tuple[str, str]], prompts: list[list[int]],
                model: LoadedModel | None = None) -> list[list[torch.Tensor]]:
        """Per key, per prompt, the unpadded [len, width] activation (one batched trace) of ``model`` (default: the
        target model)."""
        model = model or self.study.model
        ids, mask = left_pad(prompts, model.tokenizer.pad_token_id)
        if model is self.study.model:
            acts = self.executor.capture(ids, mask, keys)
        else:  # the source model of a cross-model study: always a full capture
            acts = Executor(model.nn, remote=self.study.spec.execution.remote, strategy="full").capture(ids, mask, keys)
        return [[unpad(act, row, len(p)) for row, p in enumerate(prompts)] for act in acts]

    def _means(self, plan: Plan, keys: list[tuple[str, str]], prompts: list[list[int]]) -> dict[str, torch.Tensor]:
        """Mean source activation over the probe set per right-aligned position (offset from the end)."""
        gathered = dict(zip(keys, self.gather(keys, prompts), strict=True))
        longest = max(len(p) for p in prompts)
        means = {}
        for site in plan.sites:
            per_prompt = gathered[site.access_key]
            total = torch.zeros(longest, per_prompt[0].shape[-1])
            count = torch.zeros(longest, 1)
            for act in per_prompt:
                flipped = act.flip(0).float()  # row k = offset k+1 from the end
                total[: len(act)] += flipped
                count[: len(act)] += 1
            table = total / count.clamp(min=1)
            if site.kind == "head":
                table = table.view(longest, site.n_heads, -1)[:, site.head]
            means[site.name] = table
        return means


def baseline_batch(plan: Plan, rows: list[tuple[int, str]], pad_id: int) -> Batch:
    """An unpatched batch of (probe, prompt role) rows: a model's own metrics on the probes' prompts (the source
    model's baselines in cross-model patching). KL is to the same model's clean row where the batch holds it."""
    prompts = [plan.probes[p].prompt_ids(role) for p, role in rows]
    input_ids, attention_mask = left_pad(prompts, pad_id)
    position = {row: i for i, row in enumerate(rows)}
    clean_row = torch.tensor([position.get((p, "clean"), i) for i, (p, _) in enumerate(rows)], dtype=torch.long)

    def sets(which: str) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(1, max(len(getattr(plan.probes[p], which)) for p, _ in rows))
        index = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.float32)
        for i, (p, _) in enumerate(rows):
            ids = getattr(plan.probes[p], which)
            index[i, :len(ids)] = torch.tensor(ids, dtype=torch.long) if ids else index[i, :0]
            mask[i, :len(ids)] = 1.0
        return index, mask

    answer_index, answer_mask = sets("answer_ids")
    wrong_index, wrong_mask = sets("wrong_ids")
    return Batch(index=-1, input_ids=input_ids, attention_mask=attention_mask, row_probe=[p for p, _ in rows],
                 row_role=[role for _, role in rows], row_cell=[-1] * len(rows), clean_row=clean_row,
                 answer_index=answer_index, answer_mask=answer_mask, wrong_index=wrong_index, wrong_mask=wrong_mask,
                 accesses=[], cells=[])


def _sites_using(plan: Plan, key: str) -> list[Site]:
    """The sites where the operation ``key`` (its JSON) acts: its cells' sites and its baseline edits' sites."""
    found = {site.name: site for cell in plan.cells if cell.operation.model_dump_json() == key
             for site in cell.all_sites}
    for edits in plan.baseline.values():
        for edit in edits:
            if edit.operation.model_dump_json() == key:
                found.update((site.name, site) for site in edit.sites)
    return list(found.values())


def load_vector(path: str, base_dir: Path) -> torch.Tensor:
    """A steering vector from a ``.pt`` (a tensor) or ``.npy`` file; a relative path is taken from the spec's
    folder. A file that is not a saved tensor, or a vector holding NaN or infinite values (every steered row would
    come out NaN, yet look defined), is refused naming the file."""
    file = Path(path)
    if not file.is_absolute():
        file = base_dir / file
    if not file.is_file():
        raise ClapError(f"steering vector file {file} does not exist")
    if file.suffix not in (".npy", ".pt"):
        raise ClapError(f"steering vector file {file}: use a .pt or .npy file")
    try:
        if file.suffix == ".npy":
            import numpy as np

            value = torch.from_numpy(np.asarray(np.load(file, allow_pickle=False), dtype=np.float32))
        else:
            value = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch and numpy raise many unrelated types for a file that is no tensor
        kind = "torch.save" if file.suffix == ".pt" else "numpy.save"
        raise ClapError(f"steering vector file {file} is not a tensor saved by {kind} ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'})") from None
    if not isinstance(value, torch.Tensor):
        raise ClapError(f"steering vector file {file} holds a {type(value).__name__}, not a tensor")
    value = value.float()
    bad = ~torch.isfinite(value)
    if bad.any():
        first = int(bad.reshape(-1).nonzero()[0])
        raise ClapError(f"steering vector file {file} holds {int(bad.sum())} NaN or infinite value(s) (first at "
                        f"index {first}); a steer by it would make every steered row NaN")
    return value
