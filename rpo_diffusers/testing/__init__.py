"""Helpers to build tiny, randomly initialised models from configs (tests, demos, benchmarks).

Nothing here downloads: tokenizers are written from small vocabularies, models from small configs,
and everything is saved to a folder and loaded back through ``from_pretrained``, the path real
checkpoints take.
"""
