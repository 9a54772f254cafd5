"""The backends: the pool the policies choose from (`pool`), and their health: a circuit
breaker per backend (`breaker`), fed from the request events by the tracker (`tracker`), and the
active probes (`prober`)."""
