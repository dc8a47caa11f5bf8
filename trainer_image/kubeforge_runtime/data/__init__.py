"""Training data: sources (files, JSONL, tar shards; local or S3) and packed, resumable batches."""

from kubeforge_runtime.data.loader import (
           BatchLoader,
           DataState,
           MicroBatch,
           StepBatch,
           TokenStream,
           rank_plan,
)
from kubeforge_runtime.data.sources import BUILTIN_CORPUS, SourceFile, list_files, read_pieces

__all__ = ["BUILTIN_CORPUS", "BatchLoader", "DataState", "MicroBatch", "SourceFile", "StepBatch", "TokenStream",
           "list_files", "rank_plan", "read_pieces"]
