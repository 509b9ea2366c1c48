"""Streaming inference outside the HTTP server: a Redis Streams worker (``redis``) and voice activity over an
audio file (``vad``). Both reach the model through the engine, as every entrypoint does."""
