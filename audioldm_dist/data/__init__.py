"""Data: metadata, audio, features, the shard schema and the streaming pipeline."""
