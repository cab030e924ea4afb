"""The native engine, typed objects only: NativeEngine, scheduler, model runner, KV cache, sampling."""
