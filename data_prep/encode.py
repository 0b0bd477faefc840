"""Encoding documents into token arrays: the work each tokenize worker process does.

Kept free of megatron-core and torch imports so a worker starts in milliseconds under any
multiprocessing start method; the parent process owns the output files.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import sentencepiece


class DocumentEncoder:
    """sentencepiece ids of each document followed by the end-of-document id."""

    def __init__(self, model_path: str, dtype: str) -> None:
        self.processor = sentencepiece.SentencePieceProcessor(model_file=model_path)
        self.eod = self.processor.eos_id()
        self.dtype = np.dtype(dtype)

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(all tokens of the batch, concatenated; the length of each document incl. its eod).

        One array per batch instead of one list per document keeps inter-process transfer cheap.
        One thread per call: parallelism comes from worker processes, which the caller sizes.
        """
        ids = self.processor.encode(list(texts), out_type=int, num_threads=1)
        lengths = np.fromiter((len(doc) + 1 for doc in ids), dtype=np.int64, count=len(ids))
        tokens = np.empty(int(lengths.sum()), dtype=self.dtype)
        ends = np.cumsum(lengths)
        for doc, end, length in zip(ids, ends, lengths):
            tokens[end - length : end - 1] = doc
            tokens[end - 1] = self.eod
        return tokens, lengths


# One encoder per worker process, made by the pool's initializer.
_worker_encoder: Optional[DocumentEncoder] = None


def init_worker(model_path: str, dtype: str) -> None:
    global _worker_encoder
    _worker_encoder = DocumentEncoder(model_path, dtype)


def encode_in_worker(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    assert _worker_encoder is not None, "init_worker must run first"
    return _worker_encoder(texts)
