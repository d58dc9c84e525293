"""One wrapper per llama.cpp tool: argv builder, runner, pure parser -> frozen dataclass.

Wrappers know the text formats of the tools and nothing of lacq's domain (KV configurations
arrive as ready argv, results leave as dataclasses)."""
