"""The HTTP server: the app and its guard, and one module per wire format (OpenAI, Ollama, Anthropic)."""
