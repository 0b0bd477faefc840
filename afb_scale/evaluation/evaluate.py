"""`afb-scale eval SOURCE --text FILES | --data PREFIX`: loss, perplexity, bits per byte, accuracy.

--text: plain-text files (one document each) or JSONL (`--text-field`, default "text"), read
    and tokenised on the fly as data_prep does (sentencepiece ids, then the end-of-document id).
    The documents are concatenated and cut into windows of `model.seq_length` + 1 tokens that
    overlap by one, so every token but the first is predicted exactly once.
--data: a prepared megatron-core indexed dataset (`PREFIX.bin/.idx`), split and sampled with
    the run's own settings (data.split, train.seed, megatron-core's GPTDataset). `--split valid`
    with the default sample count is exactly the batches training validated on, so the loss
    equals the "validation loss" the run printed.

Under torchrun (`torchrun --nproc_per_node N -m afb_scale.cli eval SOURCE [--pipeline P] ...`)
the model is megatron-core's, split over the N processes as in training: P pipeline stages
(DeepSpeed's PipelineModule, model/pipeline.py) of N / P tensor-parallel ranks each, for models
that do not fit one process. The full weights of a run, checkpoint or `afb-scale export` are
sharded on load, batches go through training's validation step (megatron_scoring.py), every rank
scores the same batches and rank 0 prints.

Every number is over the predicted tokens: loss is the mean next-token cross-entropy (nats),
perplexity exp(loss), token accuracy the share where argmax is the target. Bits per byte is
the summed loss / ln 2 over the UTF-8 bytes predicted: for --text the documents' bytes, for
--data the bytes of the target tokens' pieces (a byte-fallback piece is one byte, control
pieces none), which is a tokenizer-independent figure for comparing models.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from afb_scale.config import ConfigError

SPLITS = ("train", "valid", "test")


@dataclass
class Totals:
    nll: float = 0.0  # nats, summed
    tokens: int = 0
    correct: int = 0
    bytes: int = 0

    def report(self) -> dict:
        loss = self.nll / max(self.tokens, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": self.tokens,
                "bytes": self.bytes, "bits_per_byte": self.nll / math.log(2) / max(self.bytes, 1),
                "token_accuracy": self.correct / max(self.tokens, 1)}


def piece_bytes(tokenizer) -> torch.Tensor:
    """UTF-8 bytes each token id stands for (sentencepiece's '▁' is one space)."""
    sp = tokenizer.sp_model
    sizes = []
    for i in range(sp.get_piece_size()):
        if sp.is_byte(i):
            sizes.append(1)
        elif sp.is_control(i) or sp.is_unknown(i):
            sizes.append(0)
        else:
            sizes.append(len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8")))
    return torch.tensor(sizes, dtype=torch.long)


def hf_scorer(model):
    """score(tokens, labels, mask) -> (summed nll over the masked tokens, argmax hits there), from
    the one-process HF model."""
    @torch.no_grad()
    def score(tokens: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
        logits = model(input_ids=tokens, use_cache=False).logits.float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
        m = mask.reshape(-1).bool()
        hits = (logits.argmax(-1) == labels).reshape(-1)
        return float(nll[m].double().sum()), int(hits[m].sum())
    return score


def score_batch(score, tokens: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, totals: Totals,
                byte_table: torch.Tensor | None = None) -> None:
    """Add one batch ([b, s] each; mask 1 where the label counts) to the totals."""
    nll, correct = score(tokens, labels, mask)
    m = mask.reshape(-1).bool()
    totals.nll += nll
    totals.tokens += int(m.sum())
    totals.correct += correct
    if byte_table is not None:
        ids = labels.reshape(-1)[m]
        totals.bytes += int(byte_table[ids.clamp(max=len(byte_table) - 1)].sum())


def text_windows(files: list[str], tokenizer, seq: int, text_field: str) -> tuple[list[list[int]], int, int]:
    """(windows of at most seq + 1 tokens, overlapping by one; UTF-8 bytes of the documents; files read)."""
    from data_prep.errors import DataError
    from data_prep.inputs import find_input_files, read_documents

    try:
        paths = find_input_files(files)
        stream: list[int] = []
        nbytes = 0
        for doc in read_documents(paths, text_field=text_field):
            if not doc.text:
                continue
            stream += tokenizer.sp_model.encode(doc.text) + [tokenizer.eos_token_id]
            nbytes += len(doc.text.encode("utf-8"))
    except DataError as e:
        raise ConfigError(str(e)) from None
    if len(stream) < 2:
        raise ConfigError(f"--text {' '.join(files)} holds no text to evaluate")
    return [stream[i:i + seq + 1] for i in range(0, len(stream) - 1, seq)], nbytes, len(paths)


def split_samples(cfg, prefix: str, split: str, max_samples: int | None):
    """The first samples of a split of PREFIX, as the run's GPTDataset draws them."""
    import copy

    from afb_scale.config import DatasetEntry
    from afb_scale.data.datasets import build_datasets, samples_needed

    if not (Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()):
        raise ConfigError(f"--data {prefix}: no {prefix}.bin / {prefix}.idx pair (give the prefix, without the suffix)")
    cfg = copy.deepcopy(cfg)
    cfg.data.datasets = [DatasetEntry(prefix=str(prefix), weight=1.0)]
    needed = list(samples_needed(cfg))  # the same counts as training, so the same shuffle
    index = SPLITS.index(split)
    n = max_samples or needed[index] or cfg.train.eval_iters * cfg.train.global_batch_size
    needed[index] = max(needed[index], n)
    dataset = build_datasets(cfg, tuple(needed))[index]
    if dataset is None or len(dataset) == 0:
        raise ConfigError(f"--split {split} of {prefix} is empty with data.split={cfg.data.split!r}")
    return [dataset[j] for j in range(min(n, len(dataset)))]


def evaluate_windows(score, windows: list[list[int]], batch_size: int, pad_id: int, totals: Totals,
                     byte_table=None, progress: bool = True) -> Totals:
    from tqdm import tqdm

    for start in tqdm(range(0, len(windows), batch_size), desc="eval", unit="batch", disable=not progress,
                      file=sys.stderr):
        chunk = windows[start:start + batch_size]
        width = max(len(w) for w in chunk) - 1
        tokens = torch.full((len(chunk), width), pad_id)
        labels = torch.full((len(chunk), width), pad_id)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, w in enumerate(chunk):  # right padding: a causal model's real positions never see it
            tokens[i, :len(w) - 1] = torch.tensor(w[:-1])
            labels[i, :len(w) - 1] = torch.tensor(w[1:])
            mask[i, :len(w) - 1] = 1
        score_batch(score, tokens, labels, mask, totals, byte_table)
    return totals


def evaluate_samples(score, samples, batch_size: int, totals: Totals, byte_table, progress: bool = True) -> Totals:
    from tqdm import tqdm

    for start in tqdm(range(0, len(samples), batch_size), desc="eval", unit="batch", disable=not progress,
                      file=sys.stderr):
        chunk = samples[start:start + batch_size]
        batch = {k: torch.stack([torch.as_tensor(s[k]) for s in chunk]) for k in ("tokens", "labels", "loss_mask")}
        score_batch(score, batch["tokens"], batch["labels"], batch["loss_mask"], totals, byte_table)
    return totals


def run_eval(source: str, text: list[str] | None = None, data: str | None = None, split: str = "valid",
             max_samples: int | None = None, batch_size: int = 8, text_field: str = "text",
             progress: bool = True, pipeline: int = 1) -> dict:
    from afb_scale.evaluation.hf_export import is_hf_export, load_model, load_tokenizer, read_megatron_source

    if batch_size < 1:
        raise ConfigError(f"--batch-size={batch_size} must be >= 1")
    if pipeline < 1:
        raise ConfigError(f"--pipeline={pipeline} must be >= 1")
    if max_samples is not None and max_samples < 1:
        raise ConfigError(f"--max-samples={max_samples} must be >= 1")
    if pipeline > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        raise ConfigError(f"--pipeline={pipeline} needs as many processes or more under torchrun "
                          f"(torchrun --nproc_per_node N -m afb_scale.cli eval ...); this is one process")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: megatron-core, TP x PP
        from afb_scale.evaluation.megatron_scoring import megatron_scorer

        if is_hf_export(Path(source)):
            raise ConfigError(f"{source} is a Hugging Face export; eval under torchrun reads a run, a checkpoint "
                              "or an afb-scale export (the megatron-core weights)")
        src = read_megatron_source(source)
        if src.tokenizer is None:
            raise ConfigError(f"the run's tokenizer {src.cfg.data.tokenizer} is not found from here")
        tok, cfg, seq = load_tokenizer(src.tokenizer), src.cfg, src.cfg.model.seq_length
        score = megatron_scorer(src, batch_size, pipeline)
        progress = progress and int(os.environ.get("RANK", "0")) == 0
    else:
        model, tok, cfg = load_model(source)
        seq, score = model.config.max_position_embeddings, hf_scorer(model)
    totals = Totals()
    if text:
        windows, nbytes, nfiles = text_windows(text, tok, seq, text_field)
        evaluate_windows(score, windows, batch_size, tok.pad_token_id, totals, progress=progress)
        totals.bytes = nbytes
        what = f"{len(windows)} windows of <= {seq} tokens from {nfiles} file(s)"
    else:
        if cfg is None:
            raise ConfigError(f"{source} has no config.yaml, which --data needs for the split settings")
        samples = split_samples(cfg, data, split, max_samples)
        evaluate_samples(score, samples, batch_size, totals, piece_bytes(tok), progress=progress)
        what = f"{len(samples)} {split} samples of {seq} tokens from {data} (data.split={cfg.data.split})"
    return {**totals.report(), "evaluated": what}


def cmd_eval(args) -> int:
    import json

    if bool(args.text) == bool(args.data):
        raise ConfigError("give exactly one of --text FILES or --data PREFIX")
    result = run_eval(args.source, args.text, args.data, args.split, args.max_samples, args.batch_size,
                      args.text_field, progress=not args.no_progress, pipeline=args.pipeline)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        result["evaluated"] += (f", megatron-core at tensor parallel {world // args.pipeline}"
                                + (f" x pipeline parallel {args.pipeline}" if args.pipeline > 1 else ""))
    print(f"evaluated: {result['evaluated']}")
    print(f"tokens {result['tokens']:,}  bytes {result['bytes']:,}")
    print(f"loss {result['loss']:.6f}  perplexity {result['perplexity']:.3f}  "
          f"bits/byte {result['bits_per_byte']:.4f}  token accuracy {result['token_accuracy']:.4f}")
    if args.json:
        print(json.dumps(result))
    return 0


def add_arguments(p) -> None:
    p.add_argument("source", help="run directory, checkpoint directory, afb-scale export or --format hf export")
    p.add_argument("--text", nargs="+", metavar="FILE", help="plain-text / JSONL files or directories")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--data", metavar="PREFIX", help="a prepared indexed dataset (PREFIX.bin/.idx)")
    p.add_argument("--split", default="valid", choices=SPLITS, help="with --data: which split (default valid)")
    p.add_argument("--max-samples", type=int, help="with --data: samples to evaluate (default: what training "
                   "validates on, train.eval_iters x train.global_batch_size)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--pipeline", type=int, default=1, metavar="P", help="under torchrun: pipeline-parallel "
                   "stages (default 1); tensor parallelism takes the rest, processes / P")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="also print the numbers as one JSON line")
