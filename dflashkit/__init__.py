"""dflashkit: train DFlash speculative-decoding drafts, from synthetic data to a served draft."""
__version__ = "0.1.0"
