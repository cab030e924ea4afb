"""Weight payloads between processes: pickle-free encodings and shared memory / CUDA IPC."""
