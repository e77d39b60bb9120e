"""The serving side: the Flask app and its blueprint, the streamed response body (the relay),
the gunicorn worker class and the worker's lifecycle."""
