"""TLS: loading and proving credentials, building contexts, and the engine that drives them."""
