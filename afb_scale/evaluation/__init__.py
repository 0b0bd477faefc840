"""Evaluation after training: Hugging Face export, text generation, held-out loss, lm-evaluation-harness."""
