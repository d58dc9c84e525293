"""The GGUF model: the one reader, inspection, the KV-layer ordinal map, tokenizer metadata, finding a model."""
