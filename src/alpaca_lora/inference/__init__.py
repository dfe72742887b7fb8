"""Answering instructions with a tuned model."""
