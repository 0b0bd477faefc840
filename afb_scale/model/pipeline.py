"""GPT as DeepSpeed PipelineModule stages, built from megatron-core blocks.

megatron-core's own pipeline schedules hard-code CUDA, so pipeline parallelism goes through
DeepSpeed's PipelineModule (the Megatron-DeepSpeed / GPT-NeoX pattern):

    [embedding] [transformer layer] x L [final norm] [output layer (tied to the embedding)]

Each piece wraps the same megatron-core module GPTModel uses, built from the same seeds
(see SeededTransformerLayer), so a pipelined model equals `gpt.build_gpt_model` weight for
weight; tests check that. Tensor parallelism works inside each stage as usual.
"""

from __future__ import annotations

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.transformer.spec_utils import build_module

from afb_scale.config import ModelConfig, ParallelConfig
from afb_scale.model.gpt import causal_attention_mask, layer_spec_for, transformer_config
from afb_scale.model.lm_loss import LMLoss
from afb_scale.model.norm import Norm


class EmbeddingPipe(torch.nn.Module):
    """tokens [b, s] -> hidden [s, b, h]; on the last stage, hidden -> vocab-parallel logits."""

    def __init__(self, tc, model: ModelConfig, position_embedding_type: str):
        super().__init__()
        self.embedding = LanguageModelEmbedding(
            config=tc,
            vocab_size=model.padded_vocab_size,
            max_sequence_length=model.seq_length,
            position_embedding_type=position_embedding_type,
        )
        # Weightless: the tied embedding weight is passed in at call time, as GPTModel does.
        self.output_layer = tensor_parallel.ColumnParallelLinear(
            tc.hidden_size, model.padded_vocab_size, config=tc, init_method=tc.init_method,
            bias=False, skip_bias_add=False, gather_output=False, skip_weight_param_allocation=True,
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
        return self.embedding(tokens, positions)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits, _ = self.output_layer(hidden, weight=self.embedding.word_embeddings.weight)
        return logits


def _tied_logits(module: EmbeddingPipe, hidden: torch.Tensor) -> torch.Tensor:
    return module.logits(hidden)


class TransformerLayerPipe(torch.nn.Module):
    """One megatron-core TransformerLayer: hidden [s, b, h] -> hidden, causal mask built here."""

    def __init__(self, tc, model: ModelConfig, layer_number: int, seed: int):
        super().__init__()
        self.layer = build_module(layer_spec_for(model, seed), config=tc, layer_number=layer_number)
        self.register_buffer("mask", causal_attention_mask(model.seq_length), persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # Every sample is model.seq_length long (under sequence parallelism `hidden` holds a
        # slice of it, and attention gathers the full sequence), so the full mask always fits.
        out, _ = self.layer(hidden, attention_mask=self.mask)
        return out


class FinalNormPipe(torch.nn.Module):
    def __init__(self, tc, model: ModelConfig):
        super().__init__()
        self.norm = Norm(tc, tc.hidden_size, eps=tc.layernorm_epsilon)  # GPTModel's final norm (gpt.py)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden)


class OutputLayerPipe(torch.nn.Module):
    """Untied output projection (model.tie_embeddings = false)."""

    def __init__(self, tc, model: ModelConfig):
        super().__init__()
        self.output_layer = tensor_parallel.ColumnParallelLinear(
            tc.hidden_size, model.padded_vocab_size, config=tc, init_method=tc.init_method,
            bias=False, skip_bias_add=False, gather_output=False,
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits, _ = self.output_layer(hidden)
        return logits


def build_pipeline_model(
    model: ModelConfig,
    parallel: ParallelConfig,
    topology,
    precision: str = "fp32",
    seed: int = 1234,
    loss_fn: LMLoss | None = None,
    activation_checkpointing: bool = False,
) -> PipelineModule:
    if model.position_embedding_type != "learned_absolute":
        # Rotary embeddings would have to be computed in every layer stage; not wired up yet.
        raise NotImplementedError("pipeline parallelism supports position_embedding_type=learned_absolute")
    tc = transformer_config(model, parallel, precision)
    pos = model.position_embedding_type
    layers = [TiedLayerSpec("embed", EmbeddingPipe, tc, model, pos, tied_weight_attr=["embedding.word_embeddings.weight"])
              if model.tie_embeddings else LayerSpec(EmbeddingPipe, tc, model, pos)]
    layers += [LayerSpec(TransformerLayerPipe, tc, model, i + 1, seed) for i in range(model.num_layers)]
    layers.append(LayerSpec(FinalNormPipe, tc, model))
    if model.tie_embeddings:
        # The last stage's copy needs only the word embedding (DeepSpeed broadcasts it from
        # stage 0 and all-reduces its gradient between the two stages).
        layers.append(TiedLayerSpec("embed", EmbeddingPipe, tc, model, "none", forward_fn=_tied_logits,
                                    tied_weight_attr=["embedding.word_embeddings.weight"]))
    else:
        layers.append(LayerSpec(OutputLayerPipe, tc, model))
    torch.manual_seed(seed)  # embedding init, as in build_gpt_model; layers reseed themselves
    module = PipelineModule(
        layers=layers,
        loss_fn=loss_fn or LMLoss(),
        topology=topology,
        partition_method="type:TransformerLayerPipe",
        activation_checkpoint_interval=1 if activation_checkpointing else 0,
        checkpointable_layers=["TransformerLayerPipe"],
    )
    if model.tie_embeddings and topology.get_dim("pipe") > 1 and module.stage_id == module.num_stages - 1:
        # The last stage's tied copy: megatron's convention (`shared`) keeps it out of the
        # gradient norm, so the norm counts the embedding once, as a one-stage model does.
        module.tied_modules["embed"].embedding.word_embeddings.weight.shared = True
    return module
