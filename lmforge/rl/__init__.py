"""Reinforcement-learning parts: reward functions (so far a reward model's score)."""
