"""Stream a chat answer through the gateway with the official OpenAI client, and show where it was routed.

    .venv/bin/python examples/stream_chat.py ["your question"] [--base-url http://127.0.0.1:8000/v1]
"""

from __future__ import annotations

import argparse

from openai import OpenAI

QUESTION = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. " \
           "How many clips did Natalia sell altogether in April and May?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("question", nargs="?", default=QUESTION)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--max-tokens", type=int, default=200)
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key="unused")
    raw = client.chat.completions.with_raw_response.create(
        model="router", stream=True, stream_options={"include_usage": True}, max_tokens=args.max_tokens,
        messages=[{"role": "user", "content": args.question}],
    )
    print(f"routed to {raw.headers['x-router-backend']} ({raw.headers['x-router-reason']}), "
          f"p(success) = {raw.headers.get('x-router-p-success', 'n/a')}, "
          f"scorer {raw.headers.get('x-router-scorer-ms', 'n/a')} ms\n")
    for chunk in raw.parse():
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
        elif chunk.usage:
            print(f"\n\n[{chunk.model}: {chunk.usage.prompt_tokens} prompt + "
                  f"{chunk.usage.completion_tokens} completion tokens]")


if __name__ == "__main__":
    main()
