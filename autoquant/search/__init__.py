"""The search: the strategy interface (ask/tell), the loop that owns evaluation, cache,
budget and journal, parallel workers, the trust checks (held-out re-check, ranking audit,
monotonicity), the deploy check in the runtime, and the conformance suite for strategies."""
