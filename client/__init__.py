"""The load-generating client: drives a counter server and reports on it."""
