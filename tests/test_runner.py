"""The one generation path (runtime/runner.py): one place per request, chat rendered inside it, one cancel path."""

from __future__ import annotations

import pytest

from llmapi.engine.chat import default_template
from llmapi.engine.types import ContextLengthExceeded, GenerationRequest, GenerationResult, Piece
from llmapi.runtime.runner import start
from tests.conftest import FAKE_CONTEXT, FakeEngine, FakeHandle


class KeptEngine(FakeEngine):
    """A fake engine that keeps its handles and counts its chat renderings."""

    def __init__(self) -> None:
        super().__init__()
        self.handles: list[FakeHandle] = []
        self.rendered = 0

    def submit(self, request: GenerationRequest) -> FakeHandle:
        handle = super().submit(request)
        self.handles.append(handle)
        return handle

    def render_chat(self, messages):
        self.rendered += 1
        return super().render_chat(messages)


@pytest.fixture
def kept() -> KeptEngine:
    """A fresh keeping engine."""
    return KeptEngine()


@pytest.fixture
def service(make_app, kept):
    """The engine service of an app on the keeping engine, inside its app context."""
    app = make_app(kept, threads=3, max_inflight=2)
    with app.app_context():
        yield app.extensions["llmapi.engine"]


def request(tokens: int = 2, prompt: str = "hi") -> GenerationRequest:
    """A small generation request."""
    return GenerationRequest(prompt=prompt, max_new_tokens=tokens)


def test_runner_holds_one_place_until_the_last_choice_ends(service):
    generation = start(service, [request(), request(), request()])
    assert service.admission.count == 1
    first, *rest = generation.handles
    first.result()
    assert service.admission.count == 1
    for handle in rest:
        handle.result()
    assert service.admission.count == 0


def test_runner_renders_the_chat_inside_the_place_into_every_choice(service, kept):
    messages = [{"role": "user", "content": "Say hello."}]
    generation = start(service, [request(prompt=""), request(prompt="")], messages=messages)
    assert kept.rendered == 1
    assert [handle.request.prompt for handle in kept.handles] == [default_template(messages)] * 2
    generation.results()


def test_runner_refuses_without_touching_the_model_when_full(service, kept):
    held = [start(service, [request()]) for _ in range(2)]
    with pytest.raises(Exception, match="capacity"):
        start(service, [request()], messages=[{"role": "user", "content": "x"}])
    assert kept.rendered == 0 and len(kept.handles) == 2
    for generation in held:
        generation.results()
    assert service.admission.count == 0


def test_runner_cancels_submitted_choices_when_a_later_one_cannot_fit(service, kept):
    too_long = request(tokens=FAKE_CONTEXT, prompt="a b c")
    with pytest.raises(ContextLengthExceeded):
        start(service, [request(), too_long])
    assert len(kept.handles) == 1 and kept.handles[0].cancelled
    assert service.admission.count == 0


def test_runner_merges_every_choice_s_events_and_ends_each_with_its_result(service):
    generation = start(service, [request(tokens=2), request(tokens=3)])
    events = list(generation.events())
    ends = [index for index, item in events if isinstance(item, GenerationResult)]
    pieces = {index: sum(1 for i, item in events if i == index and isinstance(item, Piece)) for index in (0, 1)}
    assert sorted(ends) == [0, 1] and pieces == {0: 2, 1: 3}
    assert service.admission.count == 0


def test_runner_cancel_stops_every_choice_and_frees_the_place(service, kept):
    generation = start(service, [request(), request()])
    generation.cancel()
    assert all(handle.cancelled for handle in kept.handles)
    assert service.admission.count == 0
