"""OpenAI-compatible serving: prompt encoding (`encoding`), output parsing (`parsing`), HTTP server."""
