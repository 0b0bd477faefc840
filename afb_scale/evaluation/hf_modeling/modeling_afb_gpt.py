"""Hugging Face modeling code of an afb_scale GPT (copied into every `--format hf` export).

The same network megatron-core builds from afb_scale's config (afb_scale/model/gpt.py), written
in plain torch so that `AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` needs
neither megatron-core nor afb_scale. Layout, layer by layer (megatron name -> this file's):

    embedding.word_embeddings            model.embed_tokens
    embedding.position_embeddings        model.embed_positions          (learned_absolute only)
    layers.i.input_layernorm             model.layers.i.input_layernorm
    layers.i.self_attention.linear_qkv   model.layers.i.self_attn.{q,k,v}_proj  (split per group)
    layers.i.self_attention.linear_proj  model.layers.i.self_attn.o_proj
    layers.i.pre_mlp_layernorm           model.layers.i.post_attention_layernorm
    layers.i.mlp.linear_fc1              model.layers.i.mlp.w1 (+ w3: SwiGLU's fc1 is [W1; W3])
    layers.i.mlp.feedback_read           model.layers.i.mlp.feedback_read   (V, c)
    layers.i.mlp.feedback_write          model.layers.i.mlp.feedback_bias / feedback_gate ([Ub; Ug])
    layers.i.mlp.linear_fc2              model.layers.i.mlp.w2
    decoder.final_layernorm              model.norm
    output_layer (untied only)           lm_head (tied: the embedding)

Pre-norm residual blocks; exact (erf) GELU; softmax scale 1/sqrt(head_dim); rotary embeddings
as megatron applies them (non-interleaved halves, base `rotary_base`, all of head_dim).
AFB-FFN, per token (design: ../shared/design/afb-ffn.md):
    h = W1 x (+ b1); z = gelu(V h + c); a = 2 sigmoid(Ug z) * act(h + Ub z); y = W2 a (+ b2)
with act = gelu, or silu(.) * (W3 x (+ b3)) for SwiGLU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_afb_gpt import AfbGptConfig


def _norm(config: AfbGptConfig) -> nn.Module:
    if config.normalization == "LayerNorm":
        return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
    if config.normalization == "RMSNorm":
        return nn.RMSNorm(config.hidden_size, eps=config.layer_norm_eps)
    raise ValueError(f"normalization={config.normalization!r}: choose LayerNorm or RMSNorm")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class AfbGptMLP(nn.Module):
    def __init__(self, config: AfbGptConfig):
        super().__init__()
        d, f, r, bias = config.hidden_size, config.intermediate_size, config.feedback_rank, config.use_bias
        self.gated = config.ffn_kind.endswith("swiglu")
        self.afb = config.ffn_kind.startswith("afb-")
        self.w1 = nn.Linear(d, f, bias=bias)
        self.w3 = nn.Linear(d, f, bias=bias) if self.gated else None
        self.w2 = nn.Linear(f, d, bias=bias)
        if self.afb:
            self.feedback_read = nn.Linear(f, r, bias=True)  # V, c
            self.feedback_bias = nn.Linear(r, f, bias=False)  # Ub
            self.feedback_gate = nn.Linear(r, f, bias=False)  # Ug

    def _act(self, h: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        return F.gelu(h) if u is None else F.silu(h) * u

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w1(x)
        u = self.w3(x) if self.gated else None
        if self.afb:
            z = F.gelu(self.feedback_read(h))
            a = 2.0 * torch.sigmoid(self.feedback_gate(z)) * self._act(h + self.feedback_bias(z), u)
        else:
            a = self._act(h, u)
        return self.w2(a)


class _Factor(nn.Module):
    """Holds one factor as `.weight`, so names read fc1.first.weight as megatron's linear_fc1.first.weight."""

    def __init__(self, shape):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape))


class StructuredLinear(nn.Module):
    """y = second(first(x)) (+ bias): the structured FFN projections of Wei et al. (2024).

    This is afb_scale/model/structured.py's `structured_apply` written a second time, on purpose:
    an export's remote code runs where afb_scale need not be installed, so it cannot import it.
    The export test holds the two to each other (logits to 1e-4 for every structured kind).
    lowrank: U (V x). blockdense: L (B x), B block-diagonal [nb, r/nb, n/nb]. blockshuffle:
    B2 shuffle(B1 x), both block-diagonal, `shuffle` reading elements j, j+nb, ... into block j.
    """

    def __init__(self, structure: str, n: int, m: int, rank: int, blocks: int, bias: bool):
        super().__init__()
        if structure == "lowrank":
            shapes = (rank, n), (m, rank)
        elif structure == "blockdense":
            shapes = (blocks, rank // blocks, n // blocks), (m, rank)
        else:  # blockshuffle
            q = min(n, m) // blocks
            shapes = (blocks, q, n // blocks), (blocks, m // blocks, q)
        self.structure, self.blocks = structure, blocks
        self.first, self.second = _Factor(shapes[0]), _Factor(shapes[1])
        self.bias = nn.Parameter(torch.zeros(m)) if bias else None

    @staticmethod
    def _block_diagonal(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        nb, out_b, in_b = blocks.shape
        xs = x.reshape(*x.shape[:-1], nb, in_b)
        return torch.einsum("...ki,koi->...ko", xs, blocks).reshape(*x.shape[:-1], nb * out_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = self.first.weight, self.second.weight
        if self.structure == "lowrank":
            y = F.linear(F.linear(x, first), second)
        elif self.structure == "blockdense":
            y = F.linear(self._block_diagonal(x, first), second)
        else:
            z = self._block_diagonal(x, first)
            zs = z.reshape(*z.shape[:-1], z.shape[-1] // self.blocks, self.blocks).transpose(-1, -2)  # shuffle
            y = torch.einsum("...kq,koq->...ko", zs, second).reshape(*z.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


class AfbGptStructuredMLP(nn.Module):
    """A structured FFN (lowrank / blockdense / blockshuffle x gelu / swiglu): fc1 maps d -> f,
    or d -> 2f for SwiGLU with output [gate; up] (one structured map, so not split in two)."""

    def __init__(self, config: AfbGptConfig):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        structure, base = config.ffn_kind.split("-")
        self.gated = base == "swiglu"
        r, nb, bias = config.structured_rank, config.structured_blocks, config.use_bias
        self.fc1 = StructuredLinear(structure, d, 2 * f if self.gated else f, r, nb, bias)
        self.fc2 = StructuredLinear(structure, f, d, r, nb, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.fc2(F.silu(gate) * up)
        return self.fc2(F.gelu(h))


class AfbGptAttention(nn.Module):
    def __init__(self, config: AfbGptConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        bias = config.use_bias
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, x, mask, rotary, past_key_values: Cache | None):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)  # [b, h, s, d]
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        if rotary is not None:
            cos, sin = rotary  # [b, 1, s, d]
            q = (q.float() * cos + _rotate_half(q.float()) * sin).to(q.dtype)
            k = (k.float() * cos + _rotate_half(k.float()) * sin).to(k.dtype)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        if self.kv_heads != self.heads:  # grouped-query: each kv head serves heads/kv_heads query heads
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        scale = 1.0 / math.sqrt(self.head_dim)
        if mask is None:  # no cache, no padding: plain causal, as the trained model ran
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class AfbGptDecoderLayer(nn.Module):
    def __init__(self, config: AfbGptConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = _norm(config)
        self.self_attn = AfbGptAttention(config, layer_idx)
        self.post_attention_layernorm = _norm(config)
        structured = config.ffn_kind.split("-")[0] in ("lowrank", "blockdense", "blockshuffle")
        self.mlp = AfbGptStructuredMLP(config) if structured else AfbGptMLP(config)

    def forward(self, x, mask, rotary, past_key_values):
        x = x + self.self_attn(self.input_layernorm(x), mask, rotary, past_key_values)
        return x + self.mlp(self.post_attention_layernorm(x))


class AfbGptPreTrainedModel(PreTrainedModel):
    config_class = AfbGptConfig
    base_model_prefix = "model"
    _no_split_modules = ["AfbGptDecoderLayer"]
    _supports_sdpa = True
    _supports_cache_class = True

    def _init_weights(self, module):  # only for fresh models: exports load every weight
        if isinstance(module, _Factor):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


class AfbGptModel(AfbGptPreTrainedModel):
    def __init__(self, config: AfbGptConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding_type == "learned_absolute":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        elif config.position_embedding_type != "rope":
            raise ValueError(f"position_embedding_type={config.position_embedding_type!r}: learned_absolute or rope")
        self.layers = nn.ModuleList(AfbGptDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = _norm(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _rotary(self, position_ids: torch.Tensor):
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        inv_freq = 1.0 / (self.config.rotary_base ** (
            torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim))
        freqs = position_ids.float()[..., None] * inv_freq  # [b, s, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [b, 1, s, d]
        return emb.cos(), emb.sin()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None, inputs_embeds=None, **kwargs) -> BaseModelOutputWithPast:
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, s = x.shape[:2]
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            if attention_mask is not None:  # left padding: real tokens count from 0
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -s:]
            else:
                position_ids = torch.arange(past, past + s, device=x.device).unsqueeze(0).expand(b, s)
        if self.config.position_embedding_type == "learned_absolute":
            if int(position_ids.max()) >= self.config.max_position_embeddings:
                raise ValueError(f"position {int(position_ids.max())} is beyond the trained context of "
                                 f"{self.config.max_position_embeddings} tokens")
            x = x + self.embed_positions(position_ids)
            rotary = None
        else:
            rotary = self._rotary(position_ids)
        mask = None
        if past > 0 or attention_mask is not None:
            total = past + s
            q_pos = torch.arange(past, total, device=x.device)
            mask = (torch.arange(total, device=x.device)[None, :] <= q_pos[:, None])[None, None]  # [1, 1, s, total]
            if attention_mask is not None:
                mask = mask & attention_mask[:, None, None, -total:].bool()
                mask = mask | ~mask.any(-1, keepdim=True)  # a padding query attends to all: no NaN rows
        for layer in self.layers:
            x = layer(x, mask, rotary, past_key_values)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x),
                                       past_key_values=past_key_values if use_cache else None)


class AfbGptForCausalLM(AfbGptPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: AfbGptConfig):
        super().__init__(config)
        self.model = AfbGptModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None, inputs_embeds=None, labels=None, logits_to_keep: int = 0,
                **kwargs) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, use_cache=use_cache, inputs_embeds=inputs_embeds)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:  # HF convention: labels are the inputs, shifted here
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)


__all__ = ["AfbGptForCausalLM", "AfbGptModel", "AfbGptPreTrainedModel"]
