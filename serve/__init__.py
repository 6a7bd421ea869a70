"""`sagrt serve`: an HTTP service over one SAG pipeline (native, OpenAI Images and AUTOMATIC1111 endpoints),
with request batching, per-step progress, cancellation, backpressure and a Ray Serve deployment.

Import `sagrt.serve.app.create_app` for the FastAPI app; this package's root imports nothing heavy.
"""
