"""Strategies, the trainer loop, checkpoints and schedules."""
