"""afb_scale: pretraining GPT models with AFB-FFN feed-forward blocks at scale."""

__version__ = "0.1.0"
