"""Training-side datasets: megatron-core GPTDatasets over corpora prepared by `data_prep`.

`build_datasets(cfg, num_samples)` turns `cfg.data` (a sentencepiece tokenizer and a list of
`.bin`/`.idx` prefixes with blend weights) into train/valid/test datasets through megatron-core's
`BlendedMegatronDatasetBuilder`. Each sample is a dict of int64/float tensors of length
`cfg.model.seq_length`: "tokens", "labels" (tokens shifted by one), "loss_mask" and
"position_ids"; a blend of several datasets adds "dataset_id". No "attention_mask": the model
builds its causal mask, and documents are packed without resetting positions or masks (the
GPT-2/3 recipe; the end-of-document token separates them and is a prediction target).

Everything that can be wrong with the data is checked before megatron-core touches it, with
one-line `ConfigError`s: the tokenizer's vocabulary against `model.vocab_size`, each `.bin`/`.idx`
pair for truncation or mismatch, the dataset's tokenizer against the configured one, and a split
that would leave a needed split without documents or with fewer tokens than one sample. A split
asked for no samples (the test split in training) is not built at all: megatron-core would build
it from its share of `data.split` and, were that share 0 documents, loop forever.

Distributed use: call `build_datasets` on every rank after torch.distributed is initialised.
megatron-core builds the shuffling indices on rank 0, caches them under `data.cache_dir`
(default `<train.run_dir>/data_cache`, which must be on storage all ranks share), and the other
ranks load them after a barrier. A weighted blend needs a process group even in one process;
without one, `build_datasets` runs inside `single_process_group()` for the duration of the build.
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import sentencepiece
import torch
import torch.distributed as dist

from afb_scale.config import Config, ConfigError
from data_prep.errors import DataError
from data_prep.outputs import file_sha256, metadata_path
from data_prep.tokenizer import load_tokenizer

# Importing megatron-core warns that GPU-only libraries (Apex, Transformer Engine) are absent.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import DType
    from megatron.core.datasets.utils import Split
    from megatron.core.tokenizers import MegatronTokenizerBase

# The fixed part of a megatron-core `.idx` file (indexed_dataset.py, _IndexWriter): magic,
# version, dtype code, number of sequences, number of documents (+1: the leading 0).
_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEADER = struct.Struct("<9sQBQQ")


class SentencePieceGPTTokenizer(MegatronTokenizerBase):
    """A sentencepiece model from data_prep, in the shape megatron-core's GPTDataset reads.

    The end-of-document id is the model's eos id, as data_prep trains and writes it.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        path = os.fspath(path)
        try:
            self._processor: sentencepiece.SentencePieceProcessor = load_tokenizer(path)
        except DataError as e:
            raise ConfigError(f"data.tokenizer: {e}") from None
        super().__init__(path, config={})
        self.sha256 = file_sha256(path)
        # megatron-core keys its cached sample indices on this; the hash makes a retrained
        # tokenizer at the same path a different key.
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("tokenizer_path", path), ("sha256", self.sha256)]
        )

    def tokenize(self, text: str) -> list[int]:
        return self._processor.encode(text, out_type=int)

    def detokenize(self, ids: Sequence[int] | np.ndarray | torch.Tensor) -> str:
        if isinstance(ids, (np.ndarray, torch.Tensor)):
            ids = ids.tolist()
        return self._processor.decode(list(ids))

    @property
    def vocab(self) -> dict[str, int]:
        return {self._processor.id_to_piece(i): i for i in range(self.vocab_size)}

    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size()

    @property
    def eod(self) -> int:
        return self._processor.eos_id()

    @property
    def pad(self) -> int:
        return self._processor.pad_id()

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("a pretraining tokenizer has no chat template")


def check_tokenizer_vocab(tokenizer_path: str | os.PathLike, model_vocab_size: int) -> int:
    """The tokenizer's vocabulary size, which must equal `model.vocab_size` (else ConfigError)."""
    if not tokenizer_path:
        raise ConfigError("data.tokenizer is not set; prepare one with python -m data_prep.default_corpus")
    try:
        size = load_tokenizer(tokenizer_path).get_piece_size()
    except DataError as e:
        raise ConfigError(f"data.tokenizer: {e}") from None
    if size != model_vocab_size:
        raise ConfigError(
            f"data.tokenizer={os.fspath(tokenizer_path)!r} has {size} pieces but model.vocab_size="
            f"{model_vocab_size}; set model.vocab_size={size} or use the matching tokenizer"
        )
    return size


def validate_prepared_dataset(prefix: str | os.PathLike, tokenizer_sha256: Optional[str] = None) -> int:
    """The number of documents in `<prefix>.bin`/`.idx`, after checking that both exist and
    agree and, given `tokenizer_sha256`, that the dataset's metadata (if present) names that
    tokenizer. A one-line ConfigError naming the file otherwise."""
    return _validated_dataset(prefix, tokenizer_sha256)[0]


def _validated_dataset(prefix: str | os.PathLike, tokenizer_sha256: Optional[str] = None) -> tuple[int, np.ndarray]:
    """`validate_prepared_dataset`'s checks; returns the number of documents and the token count
    of every sequence (data_prep writes one sequence per document; megatron-core's GPTDataset
    divides the sequences into the train/valid/test splits)."""
    prefix = os.fspath(prefix)
    idx_path, bin_path = Path(prefix + ".idx"), Path(prefix + ".bin")
    for path in (idx_path, bin_path):
        if not path.is_file():
            raise ConfigError(f"prepared dataset file {str(path)!r} does not exist; prepare it with python -m data_prep.tokenize")
    idx_size = idx_path.stat().st_size
    with open(idx_path, "rb") as f:
        header = f.read(_IDX_HEADER.size)
    if len(header) < _IDX_HEADER.size or not header.startswith(_IDX_MAGIC):
        raise ConfigError(f"{str(idx_path)!r} is not a megatron-core index (bad or truncated header)")
    _, version, dtype_code, sequences, documents = _IDX_HEADER.unpack(header)
    try:
        itemsize = DType.size(dtype_code)
    except ValueError:
        raise ConfigError(f"{str(idx_path)!r} has an unknown token dtype code {dtype_code}") from None
    expected_idx = _IDX_HEADER.size + sequences * (4 + 8) + documents * 8
    if version != 1 or idx_size != expected_idx:
        raise ConfigError(
            f"{str(idx_path)!r} is truncated or corrupt: {idx_size} bytes where its header promises {expected_idx}"
        )
    lengths = np.fromfile(idx_path, dtype=np.int32, count=sequences, offset=_IDX_HEADER.size)
    last_document_end = np.fromfile(idx_path, dtype=np.int64, count=1, offset=expected_idx - 8)
    if documents < 2 or int(last_document_end[0]) != sequences or (lengths < 0).any():
        raise ConfigError(f"{str(idx_path)!r} is corrupt: its document and sequence tables disagree")
    expected_bin = int(lengths.sum(dtype=np.int64)) * itemsize
    bin_size = bin_path.stat().st_size
    if bin_size != expected_bin:
        raise ConfigError(
            f"{str(bin_path)!r} has {bin_size} bytes but {idx_path.name} indexes {expected_bin}: "
            "the .bin/.idx pair is truncated or from different runs; prepare it again"
        )
    meta = metadata_path(prefix)
    if tokenizer_sha256 is not None and meta.is_file():
        recorded = json.loads(meta.read_text()).get("tokenizer", {}).get("sha256")
        if recorded is not None and recorded != tokenizer_sha256:
            raise ConfigError(
                f"{str(bin_path)!r} was tokenized with a different tokenizer than data.tokenizer "
                f"(sha256 {recorded[:12]} vs {tokenizer_sha256[:12]}, see {meta.name}); re-tokenize it "
                "or point data.tokenizer at the tokenizer it was made with"
            )
    return documents - 1, lengths


@contextmanager
def single_process_group() -> Iterator[None]:
    """A one-process gloo group for data-only use, if no process group exists yet.

    megatron-core's blended dataset asks torch.distributed for the rank; a file store in a
    temporary directory avoids picking a free port.
    """
    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory(prefix="afb_scale_pg_") as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def _parse_split(split: str) -> list[float]:
    """megatron-core's split string ("949,50,1"), checked here so a bad one is a ConfigError."""
    parts = [p.strip() for p in split.split(",")]
    if not 1 <= len(parts) <= 3 or not all(re.fullmatch(r"\d+(\.\d*)?|\.\d+", p) for p in parts):
        raise ConfigError(f"data.split={split!r} must be 1 to 3 comma-separated non-negative numbers (train,valid,test)")
    weights = [float(p) for p in parts] + [0.0] * (3 - len(parts))
    if sum(weights) <= 0:
        raise ConfigError(f"data.split={split!r} must have a positive sum")
    return weights


def split_matrix(split: str, num_samples: Sequence[int]) -> list[Optional[tuple[float, float]]]:
    """megatron-core's split matrix for `data.split` (each split's [begin, end) fraction of a
    dataset's documents, None for no share), with None also for every split asked for no
    samples: megatron-core builds every split the matrix names, and one of 0 documents it asks
    for 0 samples of loops forever (GPTDataset._get_num_epochs while its epoch holds 0 tokens).
    The other splits keep their documents: the bounds come from the whole split string."""
    _parse_split(split)  # a malformed one is a ConfigError
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    return [bounds if n > 0 else None for bounds, n in zip(matrix, num_samples)]


def _check_splits(prefix: str, split: str, lengths: np.ndarray, num_samples: Sequence[int], seq_length: int) -> None:
    """Every split megatron-core will build (see `split_matrix`) must exist in `data.split` and
    get documents holding at least one sample's tokens (seq_length + 1), divided as megatron-core
    divides them: sequence ranges rounded from the split fractions (GPTDataset splits by sequence;
    data_prep writes one per document)."""
    count_all = len(lengths)
    built = split_matrix(split, num_samples)
    for i, (name, bounds) in enumerate(zip((s.name for s in Split), built)):
        if num_samples[i] == 0:
            continue
        if bounds is None:
            raise ConfigError(
                f"data.split={split!r} gives the {name} split no share but {num_samples[i]} {name} samples are "
                f"needed; give the {name} split a share, e.g. data.split='949,50,1'"
            )
        begin, end = (int(round(b * float(count_all))) for b in bounds)
        documents = end - begin
        tokens = int(lengths[begin:end].sum(dtype=np.int64))
        if documents == 0:
            raise ConfigError(
                f"data.split={split!r} gives the {name} split 0 of the {count_all} documents in "
                f"{prefix!r}; use a corpus with more documents or a larger {name} share"
            )
        if tokens < seq_length + 1:
            raise ConfigError(
                f"data.split={split!r} gives the {name} split {documents} of the {count_all} documents in "
                f"{prefix!r}, holding {tokens} tokens, fewer than the {seq_length + 1} one sample needs "
                f"(model.seq_length={seq_length} + 1); use a larger {name} share, more data or a smaller model.seq_length"
            )


def samples_needed(cfg: Config) -> tuple[int, int, int]:
    """(train, valid, test) samples a run consumes: every step's global batch, and the fixed
    validation batches evaluated each time."""
    g = cfg.train.global_batch_size
    return cfg.train.steps * g, cfg.train.eval_iters * g, 0


def check_prepared_data(cfg: Config, num_samples: Optional[tuple[int, int, int]] = None) -> SentencePieceGPTTokenizer:
    """Every data check that needs no process group: the tokenizer matches the model, each
    .bin/.idx pair is whole and made with that tokenizer, each needed split has documents.
    Returns the tokenizer. Raises a one-line ConfigError."""
    data = cfg.data
    num_samples = num_samples or samples_needed(cfg)
    if not data.datasets:
        raise ConfigError("data.datasets is empty; list prepared datasets (python -m data_prep.default_corpus makes one)")
    if len(num_samples) != 3 or any(n < 0 for n in num_samples):
        raise ValueError(f"num_samples={num_samples} must be three non-negative counts (train, valid, test)")
    check_tokenizer_vocab(data.tokenizer, cfg.model.vocab_size)
    tokenizer = SentencePieceGPTTokenizer(data.tokenizer)
    for entry in data.datasets:
        _, lengths = _validated_dataset(entry.prefix, tokenizer.sha256)
        _check_splits(entry.prefix, data.split, lengths, num_samples, cfg.model.seq_length)
    return tokenizer


def build_datasets(
    cfg: Config, num_samples: tuple[int, int, int]
) -> tuple[Optional[torch.utils.data.Dataset], Optional[torch.utils.data.Dataset], Optional[torch.utils.data.Dataset]]:
    """(train, valid, test) datasets of at least `num_samples` samples each (None for a split
    asked for 0 samples). Call on every rank; see the module docstring."""
    data = cfg.data
    tokenizer = check_prepared_data(cfg, num_samples)

    prefixes = [entry.prefix for entry in data.datasets]
    # One dataset takes megatron-core's unblended path (its weight is meaningless there).
    weights = [entry.weight for entry in data.datasets] if len(prefixes) > 1 else None
    config = GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.model.seq_length,
        blend=(prefixes, weights),
        split=data.split,
        path_to_cache=data.cache_dir or os.path.join(cfg.train.run_dir, "data_cache"),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    # Only the splits asked for samples: megatron-core would build (and, with 0 documents, hang
    # on) every split with a share. The cache key includes this matrix; the samples do not change.
    config.split_matrix = split_matrix(data.split, num_samples)
    # Every rank gets the datasets: the data-parallel ranks read different samples of them, and
    # tensor/pipeline ranks that need no data simply never index them.
    builder = BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True, config)
    with single_process_group():
        train, valid, test = builder.build()
    return train, valid, test
