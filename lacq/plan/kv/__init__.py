"""KV-cache types, configurations by KV-layer ordinal, policy files and the turbo types' numpy reference."""
