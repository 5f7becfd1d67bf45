"""The network: its config, the Qwen2 modules, attention, RoPE (and YaRN), the KV caches, the CPU's arithmetic and
the split over several machines. Imports nothing above the base (errors, files)."""
