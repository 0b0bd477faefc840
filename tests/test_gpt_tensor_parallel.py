"""A whole megatron-core GPTModel with each AFB spec: TP=2 equals TP=1 for the same weights,
before and after one optimizer step."""

import pytest
import torch

from multiproc import run_ranks

SEQ, VOCAB = 16, 200


def _gpt_rank(rank, world, ffn_kind):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from afb_scale.config import ModelConfig, ParallelConfig
    from afb_scale.model.gpt import build_gpt_model, causal_attention_mask, position_ids_for
    from afb_scale.model.tp_layout import gather_full_state, load_full_state
    from afb_scale.parallel.groups import init_distributed

    init_distributed(ParallelConfig(tensor=world))
    tp_group = parallel_state.get_tensor_model_parallel_group()
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_kind=ffn_kind,
                      feedback_rank=8, seq_length=SEQ, vocab_size=VOCAB)
    model = build_gpt_model(cfg, ParallelConfig(tensor=world), seed=7)
    params = dict(model.named_parameters())
    init_state = gather_full_state(params, params, tp_group)
    # Non-zero feedback, drawn on the full tensors so both layouts get the same values.
    full = dict(init_state)
    gen = torch.Generator().manual_seed(11)
    for name in sorted(full):
        if "feedback_write" in name:
            full[name] = torch.randn(full[name].shape, generator=gen) * 0.5
    load_full_state(model, full, rank, world)

    tokens = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(5))
    labels = torch.roll(tokens, -1, 1)
    mask, pos = causal_attention_mask(SEQ), position_ids_for(tokens)
    # SGD, not Adam: Adam divides by sqrt(v) and turns 1e-9 rounding differences in
    # near-zero gradients into lr-sized steps, which would test rounding, not sharding.
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(2):
        opt.zero_grad()
        loss = model(tokens, pos, mask, labels=labels).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        logits = model(tokens, pos, mask)  # vocab-parallel: gather the shards
    parts = [torch.empty_like(logits) for _ in range(world)]
    dist.all_gather(parts, logits.contiguous(), group=tp_group)
    return init_state, losses, torch.cat(parts, -1)


@pytest.mark.parametrize("ffn_kind", ["afb-gelu", "afb-swiglu"])
def test_gpt_tp2_matches_tp1(ffn_kind):
    [(init1, losses1, logits1)] = run_ranks(_gpt_rank, 1, ffn_kind)
    for init2, losses2, logits2 in run_ranks(_gpt_rank, 2, ffn_kind):
        # Same seed -> same full model at every TP degree (CPU init + per-layer seeding).
        assert init2.keys() == init1.keys()
        for name in init1:
            torch.testing.assert_close(init2[name], init1[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(torch.tensor(losses2), torch.tensor(losses1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logits2, logits1, rtol=1e-5, atol=1e-5)
    assert losses1[1] < losses1[0]  # the step did something the second forward can see
