"""make-shards: AudioLDM dataset_root.json splits → verified WebDataset shards."""
