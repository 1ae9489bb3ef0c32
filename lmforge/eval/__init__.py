"""Evaluation: code pass rates, perplexity, text metrics."""
