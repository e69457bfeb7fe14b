"""Checkpoint converters, one module per model family; `scripts/convert_checkpoint.py` is the command."""
