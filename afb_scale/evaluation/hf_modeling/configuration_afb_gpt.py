"""Hugging Face config of an afb_scale GPT (copied into every `--format hf` export).

Self-contained on purpose: transformers loads this file from the export directory with
`trust_remote_code=True`, where afb_scale itself need not be installed.
"""

from transformers import PretrainedConfig

FFN_KINDS = ("gelu", "swiglu", "afb-gelu", "afb-swiglu",
             *(f"{structure}-{base}" for structure in ("lowrank", "blockdense", "blockshuffle") for base in ("gelu", "swiglu")))


class AfbGptConfig(PretrainedConfig):
    model_type = "afb_gpt"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 8192,  # the padded embedding size (what the logits cover)
        hidden_size: int = 64,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,  # megatron's num_query_groups
        intermediate_size: int = 256,  # ffn hidden f
        ffn_kind: str = "afb-gelu",
        feedback_rank: int = 64,
        structured_rank: int = 0,  # structured kinds: r of lowrank / blockdense (0 for blockshuffle)
        structured_blocks: int = 1,  # structured kinds: block count of blockdense / blockshuffle
        max_position_embeddings: int = 128,  # the trained sequence length
        position_embedding_type: str = "learned_absolute",  # or "rope"
        rotary_base: float = 10000.0,
        normalization: str = "LayerNorm",  # or "RMSNorm"
        layer_norm_eps: float = 1e-5,
        use_bias: bool = True,
        tie_word_embeddings: bool = True,
        eos_token_id: int | None = 2,
        pad_token_id: int | None = 0,
        bos_token_id: int | None = None,
        use_cache: bool = True,
        **kwargs,
    ):
        if ffn_kind not in FFN_KINDS:
            raise ValueError(f"ffn_kind={ffn_kind!r}: choose one of {', '.join(FFN_KINDS)}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.intermediate_size = intermediate_size
        self.ffn_kind = ffn_kind
        self.feedback_rank = feedback_rank
        self.structured_rank = structured_rank
        self.structured_blocks = structured_blocks
        self.max_position_embeddings = max_position_embeddings
        self.position_embedding_type = position_embedding_type
        self.rotary_base = rotary_base
        self.normalization = normalization
        self.layer_norm_eps = layer_norm_eps
        self.use_bias = use_bias
        self.use_cache = use_cache
        super().__init__(eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
