"""The gunicorn side, used by gunicorn.conf.py: the worker class, request reading, the accept board, hooks."""
