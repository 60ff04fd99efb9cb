"""The HTTP layer of a replica: the OpenAI-compatible API, the admin routes, the dashboard and the
Prometheus exposition."""
