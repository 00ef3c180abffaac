"""Causal language models: SmolLM2 from its GGUF wheel, chat dialogs, perplexity, generations."""
