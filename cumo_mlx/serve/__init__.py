"""`cumo-mlx serve`: an OpenAI-compatible HTTP server with images.

app.py (routes), schema.py (request checks, messages -> prompt), images.py (image sources),
completion.py (answers in OpenAI's shapes), stops.py (stop strings), errors.py (error bodies),
metrics.py (Prometheus text), backend.py (the generation interface and its continuous-batching backend).
"""
