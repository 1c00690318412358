"""Training DaRL checkpoints from JSONL {query, item, label} data."""
