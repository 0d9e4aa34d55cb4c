# Written once here, a module without torch, so that the CLI can show it as its default.
DEFAULT_MAX_BATCH_SIZE = 16  # the most requests an engine decodes together
