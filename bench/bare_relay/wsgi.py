"""The bare floor the gateway is measured against: Flask + requests relaying a backend, with
no translation, validation, routing, logging or metrics. Only what the load generator needs to
count is added (an ``event:`` line per content chunk, a ``message`` marker on JSON answers).

Run by bench/run.py with ``--app-dir bench/bare_relay``; never used by the gateway itself.
"""

import os

import requests
from flask import Flask, Response, request

BACKEND = os.environ["GATEWAY_UPSTREAM_URL"] + "/chat/completions"
session = requests.Session()
app = Flask(__name__)


@app.post("/v1/messages")
def relay():
    body = request.get_json(force=True)
    payload = {
        "model": body["model"],
        "messages": body["messages"],
        "max_tokens": body["max_tokens"],
        "stream": bool(body.get("stream")),
    }
    if not payload["stream"]:
        answer = session.post(BACKEND, json=payload, timeout=(5, 600))
        text = answer.text.replace('"object":"chat.completion"', '"type":"message"', 1)
        return Response(text, status=answer.status_code, mimetype="application/json")
    upstream = session.post(BACKEND, json=payload, stream=True, timeout=(5, 600))

    def events():
        try:
            for line in upstream.iter_lines(chunk_size=None):
                if line.startswith(b"data: [DONE]"):
                    yield b"event: message_stop\ndata: {}\n\n"
                elif b'"content":"t' in line:  # a content chunk of the bench backend
                    yield b"event: content_block_delta\n" + line + b"\n\n"
                elif line.startswith(b"data:"):
                    yield b"event: other\n" + line + b"\n\n"
        finally:
            upstream.close()

    return Response(events(), mimetype="text/event-stream")


@app.get("/healthz")
def healthz():
    return {"status": "ok"}
