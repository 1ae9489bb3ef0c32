"""lmforge: a language model from raw text to an aligned, compressed, served model."""

__version__ = "0.1.0"
