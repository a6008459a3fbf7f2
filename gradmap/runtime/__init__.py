"""Calibration runtime: micro-batching, row sharding with all-reduce, hooks on layer inputs and
outputs, activation- and weight-gradient passes, the next-token loss, and layer streaming.
Algorithms say what they need; this layer decides how it is executed."""
