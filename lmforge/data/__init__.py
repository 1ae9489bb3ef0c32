"""Data: sources, cleaning, dedup, packing, and the datasets later stages train on."""
