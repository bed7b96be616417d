"""clap: Causal Layer Attribution via activation Patching.

Layers, bottom to top (each imports only from the layers below it; ``tests/test_layout.py`` checks this):

* ground floor, this package's modules: :mod:`clap.errors` (the one user-facing exception), :mod:`clap.yamlio`
  (YAML/JSONL with line numbers), :mod:`clap.validation` (pydantic errors as ``file:line: field``),
  :mod:`clap.devices`, :mod:`clap.contract` (the results files, columns, site kinds and metrics),
  :mod:`clap.models` and :mod:`clap.architectures` (loading causal LMs, per-family module maps) and
  :mod:`clap.analysis_options` (the spec's ``analysis:`` section);
* areas: ``corpora`` (PubMed in, corpus out), ``finetuning`` (HF Trainer / LoRA), ``interventions`` (specs compiled
  to batched nnsight runs), ``analyses`` (statistics, figures, reports); an area never imports another area;
* roof, :mod:`clap.app`: the command line and the whole-study runner (``clap run``).
"""

__version__ = "0.1.0"
