"""What crosses the engine's process edge: request/response types, HTTP routes, client, SGLang adapter."""
