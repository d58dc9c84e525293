"""Needle-in-a-haystack probes: prompts, runners, the grid."""
