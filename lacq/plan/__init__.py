"""What to build from a model: weight recipes -> per-tensor plans, and KV-cache configurations."""
