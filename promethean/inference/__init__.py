# Written once here, a module without torch, so that the CLI can show it as its default.
DEFAULT_MAX_BATCH_SIZE = 16  # the most requests an engine decodes together
DEFAULT_MAX_QUEUE = 64  # requests waiting beyond the batch; more are answered 503
DEFAULT_MAX_ADAPTER_ENGINES = 2  # adapters kept loaded by a server, each a merged model copy
# Bytes of finished sequences' caches a server's engine keeps for prompts that start with them.
DEFAULT_PREFIX_CACHE_BYTES = 256 * 2**20
