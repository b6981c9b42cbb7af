"""A WSGI app for the cold-load tests: the real engine on the real model, loaded LLMAPI_TEST_LOAD_DELAY s later."""

from __future__ import annotations

import os
import time
from typing import Any

from llmapi import create_app
from llmapi.config import Settings
from llmapi.runtime.service import load_engine


def slow_load(settings: Settings) -> Any:
    """Wait, then load as the service does: a cold load long enough for a burst to pile up behind it."""
    time.sleep(float(os.environ.get("LLMAPI_TEST_LOAD_DELAY", "3")))
    return load_engine(settings)


app = create_app(engine_factory=slow_load)
