"""What runs a request: backends, the step-adaptive image engine and the batching scheduler."""
