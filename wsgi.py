"""WSGI entry point for gunicorn: `gunicorn -c gunicorn.conf.py wsgi:app`. Imports no torch."""

from llmapi import create_app

app = create_app()
