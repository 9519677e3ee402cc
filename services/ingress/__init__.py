"""ingress: the OpenAI-compatible HTTP API, tenants, text in and text out."""
