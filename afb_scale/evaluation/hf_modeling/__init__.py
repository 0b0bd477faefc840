"""Hugging Face model, config and tokenizer classes: self-contained files that `--format hf` exports copy."""
