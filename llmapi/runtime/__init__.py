"""The per-process side: the model service, admission, tracking and the one generation runner."""
