"""The FastAPI gateway: REST, settings, limits, errors → HTTP, metrics, the model runtime."""
