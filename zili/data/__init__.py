"""Data: tokenizers, prepared token shards, and the packed, shuffled, resumable loader.

- `tokenizer.py`  the `Tokenizer` wrapper (Hugging Face `tokenizers`) and `train_bpe`.
- `documents.py`  input files and directories -> a stream of text documents.
- `shards.py`     token dtype choice and the shard writer (raw numpy arrays on disk).
- `manifest.py`   `manifest.json`: what a prepared dataset holds, read back with checks.
- `prepare.py`    documents -> tokens -> shards + manifest + tokenizer copy, written atomically.
- `loader.py`     `PackedDataset` (memory-mapped shards) and `Loader` (batches per rank, resumable).
- `demo.py`       the Shakespeare demo corpus, prepared on first use and cached.

Nothing here is pickled: manifests are JSON, shards are raw little-endian numpy arrays.
"""
