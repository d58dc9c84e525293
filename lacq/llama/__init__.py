"""Everything about the llama.cpp tree and its tools: source, patches, build, and one wrapper per tool."""
