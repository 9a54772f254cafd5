"""What the engines hold in their KV caches, learned from vLLM's KV cache events.

- `events`: one published batch off the wire, checked field by field.
- `index`: which engine holds which blocks, and the prompt's blocks in the same hashes.
- `feeds`: the ZMQ subscriptions that keep the index current, with replay after a gap.
- `prompt_tokens`: the prompt's token ids as the engine sees them (its own `/tokenize`).

The `kvaware` routing policy (`router.policies.kvaware`) reads the index.
"""
