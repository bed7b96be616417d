"""The roof: the ``clap`` command line and the whole-study orchestration (``clap run``, ``clap demo``).

Everything here may import every area (``corpora``, ``finetuning``, ``interventions``, ``analyses``); nothing below
imports this package. The ground floor (:mod:`clap.errors`, :mod:`clap.yamlio`, :mod:`clap.contract`,
:mod:`clap.models`, ...) lives beside it in :mod:`clap` and imports no area.
"""
