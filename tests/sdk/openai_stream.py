"""Reads one streamed chat completion through Envoy with the official OpenAI Python SDK.

Usage: openai_stream.py BASE_URL API_KEY TOKENS
Prints one JSON line: the text received and the SDK's error, if it raised one. Any other
exception (a broken stream, a parse error) escapes: the caller sees a traceback and a failure.
"""

import json
import sys

import openai


def main() -> None:
    base_url, api_key, tokens = sys.argv[1], sys.argv[2], sys.argv[3]
    client = openai.OpenAI(
        base_url=base_url,
        api_key=api_key,
        max_retries=0,
        timeout=30,
        default_headers={"x-mock-stream-tokens": tokens},
    )
    parts, chunks, error = [], 0, None
    try:
        stream = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Say 'the' a thousand times."}],
            stream=True,
        )
        for chunk in stream:
            chunks += 1
            for choice in chunk.choices:
                if choice.delta and choice.delta.content:
                    parts.append(choice.delta.content)
    except openai.APIError as e:
        body = e.body if isinstance(e.body, dict) else {}
        error = {
            "class": type(e).__name__,
            "message": e.message,
            "code": body.get("code"),
            "type": body.get("type"),
        }
    print(json.dumps({"text": "".join(parts), "chunks": chunks, "error": error}))


if __name__ == "__main__":
    main()
