"""Compression: quantization (load, export, measure), pruning, and the pieces distillation
shares with them. Configs live in compress/config.py (torch-free, so the CLI starts fast)."""
