"""Defaults of the context engine that the command line shows as its own (a module without
torch, so that reading them costs nothing)."""

# The most prompt tokens the recalled memories take in a chat prompt (`chat --memory`,
# `serve --memory`, `memory search --prompt`).
MEMORY_PROMPT_TOKENS = 256
