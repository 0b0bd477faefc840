"""An lm-evaluation-harness model for afb_scale models: `--model afb_scale --model_args path=SOURCE`.

Importing this module registers the name `afb_scale` in lm_eval's model registry. lm_eval 0.4
reads no entry points for model classes, so the installed package carries a start-up hook
(afb_scale_lm_eval_hook.py, run from the `afb_scale_lm_eval.pth` that `pip install [-e] .`
puts in site-packages) that registers the name lazily, as `afb_scale.evaluation.lm_eval_model:
AfbScaleLM`, whenever lm_eval loads its model table. So the stock command works:

    lm_eval --model afb_scale --model_args path=exports/quickstart-hf \\
        --tasks TASK --include_path DIR --batch_size 8

`afb-scale lm-eval ARGS...` (or `python -m afb_scale.evaluation.lm_eval_model ARGS...`) is the
same command line, and works without the hook (e.g. with only PYTHONPATH pointing here).
In Python: `lm_eval.simple_evaluate(model="afb_scale", model_args="path=...")` (without the
hook, `import afb_scale.evaluation.lm_eval_model` first).

SOURCE is anything hf_export.load_model reads. Scoring follows lm_eval's HF model (HFLM):
loglikelihood scores the continuation's tokens given the context, truncated from the left to
the model's context; loglikelihood_rolling scores a whole text in disjoint windows of the
context length, the first conditioned on the end-of-document token; generate_until decodes
(greedy unless the task asks to sample) until one of the task's stop strings or its
`max_gen_toks`. All three run in batches of `batch_size`.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm


@register_model("afb_scale")
class AfbScaleLM(TemplateLM):
    def __init__(self, path: str, batch_size: int | str = 8, max_length: int | None = None,
                 device: str = "cpu", max_gen_toks: int = 256, seed: int = 0, **kwargs):
        super().__init__()
        from afb_scale.evaluation.hf_export import load_model

        self.model, self.tokenizer, _ = load_model(path)
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # lm_eval's default is cuda; on a machine without one, run here
        if device not in (None, "cpu"):
            self.model.to(device)
        self._device = next(self.model.parameters()).device
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_length = int(max_length or self.model.config.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self.vocab = len(self.tokenizer)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation)."""
        prepared = []
        for key, context, continuation in requests:
            whole = (context + continuation)[-(self.max_length + 1):]
            prepared.append((whole[:-1], continuation[-(len(whole) - 1):]))  # what the window can score
        order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))  # similar lengths together
        results: list = [None] * len(prepared)
        pad = self.tokenizer.pad_token_id
        for start in tqdm(range(0, len(order), self.batch_size), desc="loglikelihood", disable=disable_tqdm):
            rows = order[start:start + self.batch_size]
            width = max(len(prepared[i][0]) for i in rows)
            tokens = torch.full((len(rows), width), pad, dtype=torch.long)
            for r, i in enumerate(rows):  # right padding: causal positions before it are unaffected
                tokens[r, :len(prepared[i][0])] = torch.tensor(prepared[i][0])
            logprobs = F.log_softmax(self.model(input_ids=tokens.to(self._device), use_cache=False).logits.float(), -1)
            for r, i in enumerate(rows):
                inp, cont = prepared[i]
                n = len(cont)
                lp = logprobs[r, len(inp) - n:len(inp)]
                target = torch.tensor(cont, device=lp.device)
                greedy = bool((lp.argmax(-1) == target).all())
                result = (float(lp.gather(-1, target[:, None]).sum()), greedy)
                results[i] = result
                key = requests[i][0]
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    self.tok_encode(text), self.prefix_token_id, self.max_length, 1)):
                windows.append((None, ctx, cont))
                owner.append(n)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for n, (lp, _) in zip(owner, scores):
            totals[n] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from afb_scale.evaluation.generate import Sampling, generate_steps

        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):  # one batch shares its generation settings
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for key, members in groups.items():
            kw = dict(requests[members[0]].args[1])
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            sample = kw.pop("do_sample", False) and float(kw.get("temperature", 1.0) or 0) > 0
            s = Sampling(max_tokens=max_new, temperature=float(kw.get("temperature", 1.0)) if sample else 0.0,
                         top_k=int(kw.get("top_k", 0) or 0), top_p=float(kw.get("top_p", 1.0) or 1.0), seed=self.seed)
            keep = max(self.max_length - max_new, 1)  # room for the answer inside the context
            for start in range(0, len(members), self.batch_size):
                rows = members[start:start + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0])[-keep:] or [self.eot_token_id] for i in rows]
                steps = [t for t in generate_steps(self.model, prompts, s, self.vocab, self.eot_token_id, self.max_length)]
                generated = torch.stack(steps, 1).tolist() if steps else [[] for _ in rows]
                for i, ids in zip(rows, generated):
                    if self.eot_token_id in ids:
                        ids = ids[:ids.index(self.eot_token_id)]
                    text = self.tok_decode(ids)
                    for stop in until:
                        if stop and stop in text:
                            text = text[:text.index(stop)]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(rows))
        bar.close()
        return out


def main(argv: list[str] | None = None) -> int:
    """lm_eval's command line; `--model afb_scale` is registered by importing this module."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
