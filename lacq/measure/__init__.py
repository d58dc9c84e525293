"""Measurements of a model and KV configuration: one module per measurement, each filing one result."""
