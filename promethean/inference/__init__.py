# Written once here, a module without torch, so that the CLI can show it as its default.
DEFAULT_MAX_BATCH_SIZE = 16  # the most requests an engine decodes together
DEFAULT_MAX_QUEUE = 64  # requests waiting beyond the batch; more are answered 503
# Adapters a server on the CPU kernels holds at once, side by side in one model (they share
# every batch); off the kernels (a GPU), adapters kept loaded, each a merged model copy.
DEFAULT_MAX_ADAPTERS = 8
DEFAULT_MAX_ADAPTER_ENGINES = 2
# Bytes of finished sequences' caches a server's engine keeps for prompts that start with them.
DEFAULT_PREFIX_CACHE_BYTES = 256 * 2**20
