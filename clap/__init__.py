"""clap: Causal Layer Attribution via activation Patching.

The distribution ships three packages with one job each: ``corpora`` (PubMed data and fine-tuning),
``interventions`` (specs compiled to batched nnsight runs) and ``analyses`` (statistics, figures, report).
This package holds only what ties them together: the version and the command line.
"""

__version__ = "0.1.0"
