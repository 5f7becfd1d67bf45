"""Models on disk: weights and their headers, loading, quantization, conversion, the local catalog, the hub,
names and aliases, the memory plan, and synthetic (random-weight) models."""
