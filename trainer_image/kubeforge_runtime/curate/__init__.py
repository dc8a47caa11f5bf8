"""Curation: captured requests and feedback become a versioned SFT dataset (issue 17).

``python -m kubeforge_runtime.curate`` is the pod; ``curate`` is the pure pipeline (decoded
records in, splits and counts out) and ``near_duplicate_pairs`` the dedup step on its own, both
for benchmarks. ``pipeline.py`` lists the steps in order.
"""

from kubeforge_runtime.cli import SettingsError
from kubeforge_runtime.curate.dedup import jaccard, near_duplicate_flags, near_duplicate_pairs
from kubeforge_runtime.curate.pipeline import Curated, curate, eval_split
from kubeforge_runtime.curate.settings import CurationSettings, parse_settings

__all__ = ["Curated", "CurationSettings", "SettingsError", "curate", "eval_split", "jaccard", "near_duplicate_flags",
           "near_duplicate_pairs", "parse_settings"]
