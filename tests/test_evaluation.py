"""Evaluation: the Hugging Face export, generation, held-out loss and the lm_eval model.

The TP = 2 x PP = 2 AFB-GELU reference run (checkpoint_cases.reference_run, shared with the
checkpoint tests) is exported twice: `afb-scale export` (megatron-core names, loaded into a
megatron-core GPTModel) and `--format hf`. A fresh process loads the latter with
`AutoModelForCausalLM` / `AutoTokenizer` (trust_remote_code) and holds its logits to megatron's
on the same tokens, and greedy generation (HF generate, afb_scale's KV-cache loop and megatron
recomputing the whole sequence each step) to agree token for token. `afb-scale eval` of the run
directory must give the validation loss the run printed. The base kinds and the layout options
the reference run does not use (SwiGLU, RoPE, RMSNorm, an untied output layer) are checked on
megatron-core models with random weights (every parameter perturbed, so AFB's zero-initialised
feedback write counts). lm_eval runs three local YAML tasks over a JSONL file this test writes
(no hub) through `afb-scale lm-eval`, and its log-likelihoods must equal ours; the stock `lm_eval`
console script (the name registered by the start-up hook that pip installs) must give the same
samples.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sysconfig
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint_cases import REPO, corpus, final_val_loss, reference_run

LOGITS_ATOL = 1e-4


def _python(script: str, *args, timeout: float = 300) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from afb_scale.evaluation.hf_export import export_hf
    from afb_scale.export import export_model

    run_dir = reference_run("tp2-pp2")
    root = tmp_path_factory.mktemp("exports")
    return run_dir, export_model(run_dir, root / "afb"), export_hf(run_dir, root / "hf")


_MEGATRON_VS_HF = r"""
import inspect, json, sys
import sentencepiece, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from afb_scale.export import load_exported
from afb_scale.model.gpt import causal_attention_mask, position_ids_for
from afb_scale.evaluation.generate import Sampling, generate_ids
from afb_scale.evaluation.evaluate import run_eval

afb_dir, hf_dir, run_dir, prefix = sys.argv[1:5]
meg, cfg = load_exported(afb_dir)
hf = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)
sp = sentencepiece.SentencePieceProcessor(model_file=f"{hf_dir}/tokenizer.model")
seq = cfg.model.seq_length
stream = sp.encode(inspect.getsource(json.decoder))
tokens = torch.tensor([stream[:seq], stream[seq:2 * seq]])
with torch.no_grad():
    a = meg(tokens, position_ids_for(tokens), causal_attention_mask(seq))
    b = hf(input_ids=tokens).logits

def megatron_greedy(prompt, n, vocab):
    ids = list(prompt)
    for _ in range(n):
        t = torch.tensor([ids])
        with torch.no_grad():
            logits = meg(t, position_ids_for(t), causal_attention_mask(len(ids)))
        ids.append(int(logits[0, -1, :vocab].argmax()))
    return ids[len(prompt):]

prompt = stream[:10]
vocab = len(tok)
ours = list(generate_ids(hf, prompt, Sampling(max_tokens=8), vocab, None, seq))
hf_gen = hf.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, 10:].tolist()
text = "def f(x):\n\t  return  x  # caf\u00e9 \u2713 \u65e5\u672c\n\n<|endoftext|>"
afb_result = ({
    "max_abs_diff": float((a - b).abs().max()), "logit_scale": float(a.abs().max()),
    "model_class": type(hf).__name__, "tokenizer_class": type(tok).__name__,
    "tied": hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr(),
    "greedy_megatron": megatron_greedy(prompt, 8, vocab), "greedy_ours": ours, "greedy_hf_generate": hf_gen,
    "tokenizer_equal": tok.encode(text[:-13], add_special_tokens=False) == sp.encode(text[:-13]),
    "eos_in_text": tok.encode(text, add_special_tokens=False)[-1] == sp.eos_id(),
    "decode_round_trip": tok.decode(sp.encode(text[:-13])) == text[:-13],
    "eval_run_dir": run_eval(run_dir, data=prefix, split="valid", progress=False),
})
"""


@pytest.fixture(scope="module")
def megatron_vs_hf(exported):
    """One fresh process (megatron-core's one-process group stays out of pytest's): the AFB
    reference run, then the random-weight models of the other kinds."""
    run_dir, afb_dir, hf_dir = exported
    return _python(_MEGATRON_VS_HF + _BASE_KINDS, afb_dir, hf_dir, run_dir, corpus()["prefix"])


def test_hf_export_matches_megatron_from_tp2_pp2_checkpoint(exported, megatron_vs_hf):
    run_dir, afb_dir, hf_dir = exported
    names = sorted(p.name for p in hf_dir.iterdir())
    assert {"config.json", "modeling_afb_gpt.py", "configuration_afb_gpt.py", "tokenization_afb_gpt.py",
            "tokenizer.model", "tokenizer_config.json", "model.safetensors", "export.json"} <= set(names), names
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_afb_gpt.AfbGptForCausalLM"
    assert config["ffn_kind"] == "afb-gelu" and config["tie_word_embeddings"] is True
    info = json.loads((hf_dir / "export.json").read_text())
    assert info["format"] == "afb_scale-hf-1" and info["step"] == 12

    got = megatron_vs_hf["afb"]
    assert (got["model_class"], got["tokenizer_class"]) == ("AfbGptForCausalLM", "AfbGptTokenizer")
    assert got["logit_scale"] > 1.0  # a real, trained model, not zeros
    assert got["max_abs_diff"] < LOGITS_ATOL, got
    assert got["tied"]
    assert got["greedy_ours"] == got["greedy_megatron"] == got["greedy_hf_generate"], got
    assert got["tokenizer_equal"] and got["eos_in_text"] and got["decode_round_trip"]
    # eval of the run directory (consolidated weights -> HF model) on the prepared valid split
    assert got["eval_run_dir"]["loss"] == pytest.approx(final_val_loss(run_dir), rel=1e-5, abs=0)
    assert got["eval_run_dir"]["tokens"] == 2 * 8 * 32  # train.eval_iters x global batch x seq_length


def test_eval_under_tensor_and_pipeline_parallelism_equals_one_process(exported, tmp_path):
    """`torchrun --nproc_per_node 4 ... eval RUN --text FILE --pipeline 2` (TP = 2 x PP = 2, training's
    pipeline engine) gives the numbers of the one-process HF model, over a short last window and
    a short last batch."""
    from afb_scale.evaluation.evaluate import run_eval

    run_dir = exported[0]
    text = tmp_path / "held_out.py"
    text.write_text((REPO / "afb_scale" / "evaluation" / "generate.py").read_text()[:1500])
    one = run_eval(str(run_dir), text=[str(text)], batch_size=4, progress=False)
    assert one["tokens"] % 32 and (one["tokens"] // 32 + 1) % 4  # both paddings are exercised
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m", "afb_scale.cli",
           "eval", str(run_dir), "--text", str(text), "--batch-size", "4", "--pipeline", "2", "--no-progress", "--json"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "megatron-core at tensor parallel 2 x pipeline parallel 2" in proc.stdout
    parallel = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (parallel["tokens"], parallel["bytes"]) == (one["tokens"], one["bytes"])
    for key in ("loss", "perplexity", "bits_per_byte", "token_accuracy"):
        assert parallel[key] == pytest.approx(one[key], rel=1e-5, abs=0), key


_BASE_KINDS = r"""
from afb_scale.config import Config, ModelConfig, ParallelConfig
from afb_scale.model.gpt import build_gpt_model
from afb_scale.evaluation.hf_export import MegatronSource, build_hf_model

STRUCTURED = [f"{s}-{b}" for s in ("lowrank", "blockdense", "blockshuffle") for b in ("gelu", "swiglu")]
results = {}
for name, options in {
    "gelu": dict(ffn_kind="gelu"),
    "swiglu-rope-rmsnorm-untied": dict(ffn_kind="swiglu", position_embedding_type="rope", normalization="RMSNorm",
                                       tie_embeddings=False),
    "afb-swiglu-rope": dict(ffn_kind="afb-swiglu", position_embedding_type="rope"),
    **{kind: dict(ffn_kind=kind, self_guided=False) for kind in STRUCTURED},  # after the guide is gone
}.items():
    m = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, feedback_rank=8,
                    vocab_size=500, **options)
    meg = build_gpt_model(m, ParallelConfig(), "fp32", seed=7).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in meg.parameters():  # every weight away from its initial value (AFB's Ub, Ug start at 0)
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    cfg = Config(model=m)
    hf, _ = build_hf_model(MegatronSource({k: v.detach().clone() for k, v in meg.named_parameters()}, cfg, None, {}))
    tokens = torch.randint(0, 500, (2, 32), generator=g)
    with torch.no_grad():
        a = meg(tokens, position_ids_for(tokens), causal_attention_mask(32))
        b = hf(input_ids=tokens).logits
        ids = tokens[0, :5].tolist()
        for _ in range(6):
            t = torch.tensor([ids])
            ids.append(int(meg(t, position_ids_for(t), causal_attention_mask(len(ids)))[0, -1, :500].argmax()))
    ours = list(generate_ids(hf, tokens[0, :5].tolist(), Sampling(max_tokens=6), 500, None, 32))
    results[name] = {"max_abs_diff": float((a - b).abs().max()), "logit_scale": float(a.abs().max()),
                     "greedy_equal": ours == ids[5:], "untied": "lm_head.weight" in dict(hf.named_parameters())}
# a structured checkpoint that still holds its self-guided guide (alpha > 0): refused, not half-exported
from afb_scale.config import ConfigError
m = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=500,
                ffn_kind="blockdense-swiglu")
guided = build_gpt_model(m, ParallelConfig(), "fp32", seed=7)
try:
    build_hf_model(MegatronSource(dict(guided.named_parameters()), Config(model=m), None, {"step": 3}))
    refusal = None
except ConfigError as e:
    refusal = str(e)
print(json.dumps({"afb": afb_result, "base": results, "guided_refusal": refusal}))
"""


def test_base_and_structured_kinds_and_layout_options_match_megatron(megatron_vs_hf):
    got = megatron_vs_hf["base"]
    structured = {f"{s}-{b}" for s in ("lowrank", "blockdense", "blockshuffle") for b in ("gelu", "swiglu")}
    assert set(got) == {"gelu", "swiglu-rope-rmsnorm-untied", "afb-swiglu-rope"} | structured
    for name, r in got.items():
        assert r["logit_scale"] > 0.1, (name, r)
        assert r["max_abs_diff"] < LOGITS_ATOL, (name, r)
        assert r["greedy_equal"], (name, r)
    assert got["swiglu-rope-rmsnorm-untied"]["untied"] and not got["gelu"]["untied"]
    refusal = megatron_vs_hf["guided_refusal"]
    assert refusal is not None and "step 3" in refusal and "alpha is > 0 until step 150" in refusal, refusal


def _tiny_hf_model(position_embedding_type: str):
    from afb_scale.evaluation.hf_modeling.configuration_afb_gpt import AfbGptConfig
    from afb_scale.evaluation.hf_modeling.modeling_afb_gpt import AfbGptForCausalLM

    torch.manual_seed(0)
    config = AfbGptConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, ffn_kind="afb-gelu", feedback_rank=4, max_position_embeddings=24,
                          position_embedding_type=position_embedding_type)
    model = AfbGptForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("positions", ["learned_absolute", "rope"])
def test_kv_cache_and_left_padded_batches_equal_single_full_passes(positions):
    from transformers.cache_utils import DynamicCache

    from afb_scale.evaluation.generate import Sampling, generate_steps

    model = _tiny_hf_model(positions)
    tokens = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(input_ids=tokens, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        model(input_ids=tokens[:, :7], past_key_values=cache, use_cache=True)
        step = torch.cat([model(input_ids=tokens[:, i:i + 1], past_key_values=cache, use_cache=True).logits
                          for i in range(7, 12)], dim=1)
    assert torch.allclose(step, full[:, 7:], atol=1e-5), (step - full[:, 7:]).abs().max()

    prompts = [tokens[0, :3].tolist(), tokens[0, :9].tolist(), tokens[0, 2:8].tolist()]
    s = Sampling(max_tokens=6)
    alone = [torch.stack(list(generate_steps(model, [p], s, 128, None, 24)), 1)[0].tolist() for p in prompts]
    batched = torch.stack(list(generate_steps(model, prompts, s, 128, None, 24)), 1).tolist()
    assert batched == alone

    sampled = Sampling(max_tokens=8, temperature=1.5, seed=5)
    first = list(generate_steps(model, prompts, sampled, 128, None, 24))
    again = list(generate_steps(model, prompts, sampled, 128, None, 24))
    assert all(torch.equal(x, y) for x, y in zip(first, again))  # the seed fixes the samples
    top1 = torch.stack(list(generate_steps(model, prompts, Sampling(max_tokens=6, temperature=1.5, top_k=1), 128,
                                           None, 24)), 1).tolist()
    nucleus = torch.stack(list(generate_steps(model, prompts, Sampling(max_tokens=6, temperature=1.5, top_p=1e-6),
                                              128, None, 24)), 1).tolist()
    assert top1 == nucleus == alone  # top-k 1 and a vanishing top-p are greedy


_OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
_LOCAL_DOCS = [{"context": "import os\nimport", "choices": [" sys", " json", " 12"], "gold": 0,
                "text": "def f(x):\n    return x + 1\n", "answer": "x"},
               {"context": "def main(", "choices": ["self):", "argv):"], "gold": 1,
                "text": "class A:\n    pass\n" * 12, "answer": "y"}]  # longer than the 32-token context
_LOCAL_TASKS = "afb_local_mc,afb_local_rolling,afb_local_gen"


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory) -> Path:
    """Three lm_eval YAML tasks (multiple choice, rolling log-likelihood, generation) over a JSONL file."""
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in _LOCAL_DOCS))
    data = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'docs.jsonl'}\ntest_split: test\n"
    (root / "mc.yaml").write_text(
        "task: afb_local_mc\n" + data + "output_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{gold}}'\nmetric_list:\n  - metric: acc\n")
    (root / "roll.yaml").write_text(
        "task: afb_local_rolling\n" + data + "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n")
    (root / "gen.yaml").write_text(
        "task: afb_local_gen\n" + data + "output_type: generate_until\ndoc_to_text: '{{context}}'\n"
        "doc_to_target: '{{answer}}'\ngeneration_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 5\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return root


def _lm_eval_args(hf_dir: Path, tasks: Path, out: Path) -> list[str]:
    return ["--model", "afb_scale", "--model_args", f"path={hf_dir}", "--tasks", _LOCAL_TASKS,
            "--include_path", str(tasks), "--batch_size", "2", "--log_samples", "--output_path", str(out)]


def _samples(out: Path) -> dict[str, list[dict]]:
    """lm_eval's --log_samples files under `out`, by task."""
    samples = {}
    for f in out.rglob("samples_*.jsonl"):
        task = f.name.split("samples_")[1].rsplit("_", 1)[0]
        samples[task] = [json.loads(line) for line in f.read_text().splitlines()]
    return samples


@pytest.fixture(scope="module")
def in_process_lm_eval(exported, local_tasks, tmp_path_factory) -> dict[str, list[dict]]:
    """`afb-scale lm-eval` on the local tasks, in this process: lm_eval's samples by task."""
    from afb_scale.cli import main

    out = tmp_path_factory.mktemp("lm_eval_out")
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**_OFFLINE, "HF_DATASETS_CACHE": str(out / "cache")}.items():
            mp.setenv(k, v)
        mp.setattr(sys, "argv", sys.argv[:])
        with contextlib.redirect_stdout(stdout):
            status = main(["lm-eval", *_lm_eval_args(exported[2], local_tasks, out)])
    assert status == 0
    assert "afb_local_mc" in stdout.getvalue()  # the results table
    return _samples(out)


def test_lm_eval_local_tasks_equal_our_loglikelihoods(exported, in_process_lm_eval):
    import torch.nn.functional as F

    from afb_scale.evaluation.generate import Sampling, generate_ids
    from afb_scale.evaluation.hf_export import load_model

    _, _, hf_dir = exported
    docs = _LOCAL_DOCS
    samples = in_process_lm_eval
    assert set(samples) == {"afb_local_mc", "afb_local_rolling", "afb_local_gen"}, sorted(samples)

    model, tok, _ = load_model(hf_dir)
    seq = model.config.max_position_embeddings

    def logprobs(ids: list[int]) -> torch.Tensor:
        """log p(ids[t] | ids[:t]) for t >= 1, one forward pass (len(ids) <= seq + 1)."""
        with torch.no_grad():
            lp = F.log_softmax(model(input_ids=torch.tensor([ids[:-1]]), use_cache=False).logits[0], -1)
        return lp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]

    for s in samples["afb_local_mc"]:
        assert len(s["resps"]) == len(docs[s["doc_id"]]["choices"])
        for args, resp in zip(s["arguments"].values(), s["resps"]):
            context, continuation = args["arg_0"], args["arg_1"]  # lm_eval's strings, our numbers
            ctx = tok.encode(context, add_special_tokens=False)
            whole = tok.encode(context + continuation, add_special_tokens=False)
            assert len(whole) <= seq + 1
            assert float(resp[0][0]) == pytest.approx(float(logprobs(whole)[len(ctx) - 1:].sum()), abs=1e-4)
    for s in samples["afb_local_rolling"]:
        # The text after an end-of-document token, predicted seq tokens at a time; each window is the
        # seq + 1 tokens ending at its last target (so the last, partial one keeps a full context).
        stream = [tok.eos_token_id] + tok.encode(docs[s["doc_id"]]["text"], add_special_tokens=False)
        expected = 0.0
        for first in range(1, len(stream), seq):
            end = min(first + seq, len(stream))
            expected += float(logprobs(stream[max(0, end - seq - 1):end])[-(end - first):].sum())
        assert float(s["resps"][0][0]) == pytest.approx(expected, abs=1e-3)
    assert max(len(tok.encode(d["text"])) for d in docs) > 2 * seq  # several windows
    for s in samples["afb_local_gen"]:
        # greedy, stopped at the task's newline, and what our own generation gives for that prompt
        prompt = tok.encode(docs[s["doc_id"]]["context"], add_special_tokens=False)
        ids = list(generate_ids(model, prompt, Sampling(max_tokens=5), len(tok), tok.eos_token_id, seq))
        ours = tok.decode(ids, skip_special_tokens=True).split("\n")[0]
        assert s["resps"][0][0] == ours


_HOOK_INSTALLED = "import sys; print(any(getattr(f, '__name__', '') == 'LmEvalModelFinder' for f in sys.meta_path))"


def test_stock_lm_eval_command_finds_the_model(exported, local_tasks, in_process_lm_eval, tmp_path):
    """The stock `lm_eval --model afb_scale` console script (the name comes from the start-up hook
    that `pip install [-e] .` puts in site-packages, afb_scale_lm_eval.pth) gives the numbers of
    the in-process run."""
    script = Path(sysconfig.get_path("scripts")) / "lm_eval"
    if not script.exists():
        pytest.skip(f"no lm_eval console script at {script}: install the eval extra (pip install -e '.[eval]')")
    env = {**os.environ, **_OFFLINE, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    hook = subprocess.run([sys.executable, "-c", _HOOK_INSTALLED], capture_output=True, text=True, env=env)
    if hook.stdout.strip() != "True":
        pytest.skip("the lm_eval start-up hook (afb_scale_lm_eval.pth) is not in this environment's site-packages: "
                    "install afb_scale with launch/setup.sh (pip install -e '.[eval]') after this commit")
    proc = subprocess.run([str(script), *_lm_eval_args(exported[2], local_tasks, tmp_path / "out")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "afb_local_mc" in proc.stdout and "|acc" in proc.stdout  # the results table
    stock, ours = _samples(tmp_path / "out"), in_process_lm_eval
    assert set(stock) == set(ours) == set(_LOCAL_TASKS.split(","))
    for task in ours:
        by_doc = {s["doc_id"]: s["resps"] for s in ours[task]}
        assert len(stock[task]) == len(by_doc) == len(_LOCAL_DOCS)
        for s in stock[task]:
            assert s["resps"] == by_doc[s["doc_id"]], (task, s["doc_id"])  # same process-independent numbers


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def test_bad_inputs_end_in_one_line(exported, tmp_path, capsys):
    from afb_scale.cli import main

    run_dir, afb_dir, hf_dir = exported
    (tmp_path / "norun" / "checkpoints").mkdir(parents=True)
    assert main(["generate", str(tmp_path / "norun"), "--prompt", "x"]) == 2
    assert _error_line(capsys) == f"error: {tmp_path / 'norun'} has no complete checkpoint"

    other = tmp_path / "other"
    other.mkdir()
    (other / "export.json").write_text(json.dumps({"format": "someone-elses-1"}))
    assert main(["eval", str(other), "--text", str(REPO / "README.md")]) == 2
    assert "export of format 'someone-elses-1'" in _error_line(capsys)

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert main(["generate", str(gpt2), "--prompt", "x"]) == 2
    assert "model of type 'gpt2'" in _error_line(capsys)

    assert main(["export", str(run_dir), str(hf_dir), "--format", "hf"]) == 2
    assert _error_line(capsys) == f"error: {hf_dir} exists; pass --overwrite to replace it"

    assert main(["eval", str(run_dir), "--text", str(REPO / "README.md"), "--pipeline", "2"]) == 2
    assert _error_line(capsys).startswith("error: --pipeline=2 needs as many processes or more under torchrun")

    assert main(["generate", str(hf_dir), "--prompt", "x", "--top-p", "0"]) == 2
    assert "--top-p=0" in _error_line(capsys)

    assert main(["generate", str(hf_dir), "--prompt", "word " * 100]) == 2  # longer than the 32-token context
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: the prompt is ") and "context is 32 tokens" in last, last

    # The real command in a fresh process (exit status, stderr, nothing on stdout).
    proc = subprocess.run([sys.executable, "-m", "afb_scale.cli", "eval", str(tmp_path / "norun"), "--text", "x"],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'norun'} has no complete checkpoint"
