"""Parallelism and other whole-model transforms, applied to a model from outside."""
