"""The OpenAI-compatible API under /v1: its routes, schemas and output formats."""
