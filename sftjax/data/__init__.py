"""Data: records (file:line) -> messages -> chat template -> token ids + loss mask -> batches."""
