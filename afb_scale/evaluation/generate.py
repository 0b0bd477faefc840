"""`afb-scale generate SOURCE --prompt TEXT`: sample a continuation, streamed to stdout.

SOURCE is anything hf_export.load_model reads (run, checkpoint, export, HF export). Decoding is
greedy at `--temperature 0` (the default), else sampling from softmax(logits / T), optionally
restricted to the `--top-k` most likely tokens and/or the smallest set whose probability
reaches `--top-p`. Each step feeds only the newest token, with the keys and values of earlier
ones held in a transformers DynamicCache. Padded vocabulary rows (the embedding is padded to a
multiple of 128) are never sampled. Generation stops at the end-of-document token, after
`--max-tokens`, or when the trained context (`model.seq_length`) is full.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from afb_scale.config import ConfigError


@dataclass
class Sampling:
    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise ConfigError(f"--max-tokens={self.max_tokens} must be >= 1")
        if self.temperature < 0:
            raise ConfigError(f"--temperature={self.temperature:g} must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise ConfigError(f"--top-k={self.top_k} must be >= 0 (0 keeps every token)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p={self.top_p:g} must be in (0, 1]")


def next_token(logits: torch.Tensor, s: Sampling, generator: torch.Generator) -> torch.Tensor:
    """One token id per row of logits [b, v] (already limited to the real vocabulary)."""
    if s.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already reach top_p (the first is always kept).
        drop = probs.cumsum(-1) - probs >= s.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_steps(model, prompts: list[list[int]], s: Sampling, vocab: int, eos_id: Optional[int],
                   context: int) -> Iterator[torch.Tensor]:
    """Yield the next token of every prompt ([b] ids) step by step, with a KV cache.

    Prompts of different lengths are left-padded and masked (positions count from each prompt's
    first real token), so a batch gives each prompt what it would get alone. Stops after
    `s.max_tokens` steps, when every row has produced the end-of-document token, or when the
    longest row fills the context; rows already ended keep yielding eos.
    """
    from transformers.cache_utils import DynamicCache

    longest = max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ConfigError("the prompt is empty after tokenisation; give some text")
    if longest >= context:
        raise ConfigError(f"the prompt is {longest} tokens; the model's context is {context} tokens "
                          f"(model.seq_length), so a prompt may have at most {context - 1}")
    generator = torch.Generator().manual_seed(s.seed)
    pad = model.config.pad_token_id or 0
    device = next(model.parameters()).device
    inputs = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)
    padded = bool((mask == 0).any())
    cache = DynamicCache(config=model.config)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for step in range(s.max_tokens):
        logits = model(input_ids=inputs, attention_mask=mask if padded else None, past_key_values=cache,
                       use_cache=True).logits[:, -1, :vocab]
        token = next_token(logits.cpu(), s, generator).to(device)
        if eos_id is not None:
            token = torch.where(done, torch.full_like(token, eos_id), token)
            done |= token == eos_id
        yield token
        if bool(done.all()) or longest + step + 1 >= context:
            return
        inputs = token[:, None]
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype, device=device)], dim=1)


def generate_ids(model, prompt_ids: list[int], s: Sampling, vocab: int, eos_id: Optional[int],
                 context: int) -> Iterator[int]:
    """Yield generated token ids of one prompt, one at a time."""
    for token in generate_steps(model, [prompt_ids], s, vocab, eos_id, context):
        yield int(token[0])


def stream(tokenizer, ids: Iterator[int], write: Callable[[str], None]) -> list[int]:
    """Write the text of `ids` as they come. A character made of several byte-fallback tokens is
    written once it is complete (the decoded text only ever grows at its end)."""
    out: list[int] = []
    shown = ""
    for token in ids:
        out.append(token)
        text = tokenizer.decode(out, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence so far
            continue
        write(text[len(shown):])
        shown = text
    text = tokenizer.decode(out, skip_special_tokens=True)
    write(text[len(shown):])
    return out


def cmd_generate(args) -> int:
    from afb_scale.evaluation.hf_export import load_model

    s = Sampling(args.max_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    s.validate()
    model, tok, _ = load_model(args.source)
    prompt_ids = tok.encode(args.prompt, add_special_tokens=False)
    context = model.config.max_position_embeddings
    ids = generate_ids(model, prompt_ids, s, len(tok), tok.eos_token_id, context)
    first = next(ids)  # the prompt-length check runs before anything is printed

    def chained():
        yield first
        yield from ids

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    start = time.perf_counter()
    write(args.prompt)
    out = stream(tok, chained(), write)
    seconds = time.perf_counter() - start
    write("\n")
    reason = ("end of document" if out[-1] == tok.eos_token_id else
              "context full" if len(prompt_ids) + len(out) >= context else "max tokens")
    mode = "greedy" if s.temperature == 0 else (f"temperature {s.temperature:g}, top-k {s.top_k or 'off'}, "
                                                f"top-p {s.top_p:g}, seed {s.seed}")
    print(f"[{len(prompt_ids)} prompt + {len(out)} generated tokens, {mode}, stopped: {reason}, "
          f"{len(out) / seconds:.1f} tokens/s]", file=sys.stderr)
    return 0


def add_arguments(p) -> None:
    p.add_argument("source", help="run directory, checkpoint directory, afb-scale export or --format hf export")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
