"""Generation: one checked request, samplers, speculation, the token loop, the text layer, caches across requests,
the model's own thread and the registry of loaded models."""
