"""Data: metadata, audio, log-mel features (`melspec`), the shard schema, the tar reader and the streaming pipeline."""
