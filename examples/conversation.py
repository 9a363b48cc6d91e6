"""A conversation through the gateway with the official OpenAI client: the Responses API continued with
previous_response_id (the gateway keeps the conversation, so any backend can answer the next turn), a streamed
turn, a chat with a tool, and the decision-only endpoint. Prints where each turn went and why.

    .venv/bin/python examples/conversation.py [--base-url http://127.0.0.1:8000/v1] [--api-key KEY]
"""

from __future__ import annotations

import argparse

import httpx
from openai import OpenAI

QUESTION = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. " \
           "How many clips did Natalia sell altogether in April and May?"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def where(headers: httpx.Headers) -> str:
    return f"[{headers['x-router-backend']}, {headers['x-router-reason']}, p={headers.get('x-router-p-success')}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="unused")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)

    raw = client.responses.with_raw_response.create(model="router", input=QUESTION,
                                                    max_output_tokens=args.max_tokens)
    first = raw.parse()
    print(f"turn 1 {where(raw.headers)} {first.id}\n{first.output_text}\n")

    with client.responses.with_streaming_response.create(
            model="router", input="And how many in May alone?", previous_response_id=first.id,
            max_output_tokens=args.max_tokens, stream=True) as streamed:
        print(f"turn 2, streamed {where(streamed.headers)}")
        for event in streamed.parse():
            if event.type == "response.output_text.delta":
                print(event.delta, end="", flush=True)
            elif event.type == "response.completed" and event.response.usage is not None:
                usage = event.response.usage
                print(f"\n[{usage.input_tokens} input tokens: the first turn came along]\n")

    question = {"role": "user", "content": "What is the weather in Paris? Use the tool."}
    raw = client.chat.completions.with_raw_response.create(model="router", messages=[question], tools=TOOLS,
                                                           tool_choice="required", max_tokens=150)
    message = raw.parse().choices[0].message
    calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
    print(f"chat with a tool {where(raw.headers)}: {calls}")
    if message.tool_calls:
        raw = client.chat.completions.with_raw_response.create(model="router", tools=TOOLS, max_tokens=40, messages=[
            question, message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": '{"temp_c": 18, "sky": "cloudy"}'}])
        print(f"the tool's result {where(raw.headers)}: {raw.parse().choices[0].message.content}\n")

    decision = httpx.post(f"{args.base_url}/route", headers={"authorization": f"Bearer {args.api_key}"},
                          json={"model": "router", "messages": [{"role": "user", "content": QUESTION}]}).json()
    print(f"POST /v1/route (nothing forwarded): {decision}")


if __name__ == "__main__":
    main()
