"""Trainer package (placeholder until the trainer lands)."""
