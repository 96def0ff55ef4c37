"""Integrations with the Hugging Face ecosystem (transformers registration, checkpoint checks)."""
