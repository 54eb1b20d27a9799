"""OpenAI-compatible HTTP server (``jaxpage serve``)."""
