"""Scoring a model (dense or under a sparse plan) on held-out long-context samples."""
