"""Hugging Face tokenizer of an afb_scale GPT: the run's own sentencepiece model, unchanged.

Copied into every `--format hf` export. Encoding is `SentencePieceProcessor.encode(text)` and
decoding `.decode(ids)`, exactly what data_prep did to the training corpus (identity
normalisation, byte fallback, kept whitespace): converting the model to a `tokenizers` fast
tokenizer could change how whitespace and unseen characters split. No BOS is added; the
end-of-document piece (sentencepiece's eos) is the EOS token.
"""

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend


class AfbGptTokenizer(SentencePieceBackend):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, eos_token="<|endoftext|>", unk_token="<unk>", pad_token="<pad>", **kwargs):
        kwargs.setdefault("legacy", True)  # keep sentencepiece's own prefix-space handling
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(vocab_file=vocab_file, eos_token=eos_token, unk_token=unk_token, pad_token=pad_token,
                         **kwargs)

    def _tokenize(self, text, **kwargs):
        return self.sp_model.encode(text, out_type=str)

    def convert_tokens_to_string(self, tokens):
        return self.sp_model.decode_pieces(list(tokens))

    def _decode(self, token_ids, skip_special_tokens=False, **kwargs):
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        if skip_special_tokens:
            special = set(self.all_special_ids)
            ids = [i for i in ids if i not in special]
        return self.sp_model.decode(ids)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        return token_ids_0 if token_ids_1 is None else token_ids_0 + token_ids_1
