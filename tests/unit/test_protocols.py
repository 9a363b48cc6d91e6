"""What differs on the wire between the forwarded APIs lives in one object per API (router/protocols.py): the
body sent upstream, the outcome of a JSON answer, the reading of a relayed stream and its error event; and the
relay reads every stream through it (recorded vLLM streams: tests/unit/recorded/README.md)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from router.api import HOT_ROUTES
from router.config import BackendConfig, ResilienceConfig
from router.protocols import PROTOCOLS, ChatProtocol, ChatReader, ResponsesProtocol, ResponsesReader
from router.upstream import Backend, Outcome, relay_stream

RECORDED = Path(__file__).parent / "recorded"
CHAT = ChatProtocol("chat/completions")
RESPONSES = ResponsesProtocol("responses")


def sse(doc: dict, event: str | None = None) -> bytes:
    return (f"event: {event}\n".encode() if event else b"") + b"data: " + orjson.dumps(doc)


def test_every_forwarding_route_has_its_protocol() -> None:
    assert {path.removeprefix("/v1/") for path in HOT_ROUTES} == set(PROTOCOLS)
    assert PROTOCOLS["completions"] is ChatProtocol and PROTOCOLS["responses"] is ResponsesProtocol


def test_chat_streams_ask_for_usage_unless_the_client_did_and_responses_never_do() -> None:
    body = {"model": "router", "messages": [], "stream": True, "stream_options": {"continuous_usage_stats": False}}
    sent = CHAT.upstream_body(body, "org/m", stream=True, client_wants_usage=False)
    assert sent["model"] == "org/m"
    assert sent["stream_options"] == {"continuous_usage_stats": False, "include_usage": True}
    assert body["stream_options"] == {"continuous_usage_stats": False} and body["model"] == "router"  # a copy
    assert CHAT.upstream_body(body, "m", stream=True, client_wants_usage=True)["stream_options"] == \
        body["stream_options"]
    assert "stream_options" not in CHAT.upstream_body({"model": "r"}, "m", stream=False, client_wants_usage=False)
    responses = {"model": "router", "input": [], "stream": True}
    assert RESPONSES.upstream_body(responses, "m", stream=True, client_wants_usage=False) == dict(responses, model="m")


def test_the_chat_reader_takes_usage_and_hides_the_usage_chunk_only_when_the_gateway_asked() -> None:
    delta = sse({"id": "c1", "choices": [{"delta": {"content": "4"}}]})
    usage = sse({"id": "c1", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}})
    hiding, showing = CHAT.reader(client_wants_usage=False), CHAT.reader(client_wants_usage=True)
    assert isinstance(hiding, ChatReader)
    assert [hiding.feed(e) for e in (delta, usage, b"data: [DONE]")] == [True, False, True]
    assert [showing.feed(e) for e in (delta, usage)] == [True, True]
    for reader in (hiding, showing):
        outcome = reader.outcome()
        assert (outcome.usage.prompt_tokens, outcome.usage.completion_tokens, outcome.completion_id) == (5, 2, "c1")
        assert not reader.finished
    assert orjson.loads(hiding.error_event("cut").removeprefix(b"data: "))["error"]["code"] == "stream_interrupted"


def test_the_responses_reader_passes_every_event_and_finishes_at_the_terminal_one() -> None:
    events = [e for e in (RECORDED / "responses_stream.sse").read_bytes().split(b"\n\n") if e.strip()]
    reader = RESPONSES.reader(client_wants_usage=False)
    assert isinstance(reader, ResponsesReader)
    for event in events[:-1]:
        assert reader.feed(event) and not reader.finished
    assert reader.feed(events[-1]) and reader.finished
    outcome = reader.outcome()
    assert outcome.usage is not None and outcome.usage.completion_tokens == 6
    assert outcome.completion_id == outcome.response["id"] and outcome.response["status"] == "incomplete"
    error = reader.error_event("backend x's stream broke off")
    assert error.startswith(b"event: error\ndata: ")
    doc = orjson.loads(error.split(b"data: ", 1)[1])
    assert (doc["type"], doc["code"], doc["sequence_number"]) == ("error", "stream_interrupted", len(events))


def test_the_outcome_of_a_json_answer_per_protocol() -> None:
    plain = (RECORDED / "responses_plain.json").read_bytes()
    outcome = RESPONSES.outcome_of_body(plain)
    assert outcome.ok and outcome.completion_id == orjson.loads(plain)["id"] and outcome.response is not None
    assert outcome.usage is not None and outcome.usage.prompt_tokens > 0
    chat = CHAT.outcome_of_body(orjson.dumps({"id": "c", "choices": [{}], "usage": {"prompt_tokens": 3,
                                                                                     "completion_tokens": 1}}))
    assert (chat.ok, chat.completion_id, chat.usage.prompt_tokens, chat.response) == (True, "c", 3, None)
    assert CHAT.outcome_of_body(b"not json") == Outcome(ok=True)
    assert RESPONSES.outcome_of_body(b"[]") == Outcome(ok=True)


class Upstream:
    """A backend's streamed answer, as ``relay_stream`` reads it, in arbitrary pieces."""

    def __init__(self, body: bytes, piece: int) -> None:
        self.pieces = [body[i:i + piece] for i in range(0, len(body), piece)]
        self.closed = False

    async def next_chunk(self) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""

    async def aclose(self) -> None:
        self.closed = True


@pytest.mark.parametrize("piece", [7, 100, 100_000])
async def test_the_relay_records_a_finished_response_before_its_last_bytes_go_out(piece: int) -> None:
    body = (RECORDED / "responses_stream.sse").read_bytes()
    upstream = Upstream(body, piece)
    backend = Backend(BackendConfig(name="b", base_url="http://127.0.0.1:1/v1", model="m", input_cost_per_mtok=0,
                                    output_cost_per_mtok=0), ResilienceConfig())
    seen: list[str] = []
    relayed = bytearray()
    outcomes: list[Outcome] = []

    async def finished(outcome: Outcome) -> None:
        seen.append(f"finished after {len(relayed)} bytes")
        assert outcome.response is not None and outcome.usage is not None

    relay = relay_stream(upstream, backend, reader=RESPONSES.reader(client_wants_usage=False),  # type: ignore[arg-type]
                         deadline=float("inf"), on_first_byte=lambda: None, on_done=outcomes.append,
                         on_finished=finished)
    async for chunk in relay:
        relayed += chunk
    assert bytes(relayed) == body  # passed on unchanged
    assert len(seen) == 1 and int(seen[0].split()[2]) < len(body)  # recorded before the terminal event went out
    assert upstream.closed and len(outcomes) == 1 and outcomes[0].ok and outcomes[0].usage.completion_tokens == 6
