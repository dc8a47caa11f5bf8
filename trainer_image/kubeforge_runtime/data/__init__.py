"""Training data: sources (files, JSONL, tar shards; local or S3), packed resumable batches,
and SFT records with a loss mask over their targets."""

from kubeforge_runtime.data.loader import (
           BatchLoader,
           DataState,
           MicroBatch,
           SFTStream,
           StepBatch,
           TokenStream,
           rank_plan,
)
from kubeforge_runtime.data.sft import PromptEncoder, SFTRecord, SFTSample, build_sample
from kubeforge_runtime.data.sources import BUILTIN_CORPUS, SourceFile, list_files, read_pieces

__all__ = ["BUILTIN_CORPUS", "BatchLoader", "DataState", "MicroBatch", "PromptEncoder", "SFTRecord", "SFTSample",
           "SFTStream", "SourceFile", "StepBatch", "TokenStream", "build_sample", "list_files", "rank_plan",
           "read_pieces"]
