"""The boundary to the user's code: the `Evaluator` contract, the one adapter that calls
it (value checks, ``metric_eval``, timeouts, hold-out data, determinism, worker specs),
the functional form (a function and data instead of a class), and the accuracy
criterion (direction, absolute or relative loss)."""
