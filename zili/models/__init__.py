"""Decoder-only language models. Nothing in here knows about parallelism, training or data."""
