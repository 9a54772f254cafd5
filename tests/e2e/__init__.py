"""End-to-end tests against real vLLM engines (`make e2e`)."""
