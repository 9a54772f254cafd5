"""A fake vLLM engine: an aiohttp app that speaks vLLM's OpenAI-compatible HTTP API.

It generates deterministic output ("tok0 tok1 ..."), cheaply, and lets tests steer its
timing and failures at run time through `EngineBehaviour` while recording what it saw in
`EngineState`. Used by the tests, the router's `--demo` mode and benchmarks.

- `state`: the knobs, the counters and the served models, under AppKeys.
- `replies`: errors, JSON and SSE replies, and the `proxied` wrapper every endpoint wears.
- `tokens`: the byte-level "tokenizer" and the deterministic output text.
- `generate`, `pooling`, `audio`, `probes`: the endpoints, by family.
- `app`: `make_engine_app` (the routes) and `start_engine` (a `RunningEngine` on a port).
"""
