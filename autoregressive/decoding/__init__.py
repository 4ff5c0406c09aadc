"""The decoding library every strategy samples with: logits processing and classifier-free
guidance (`logits`), the KV-cached group loop (`group_decode`), the fast path (`fast_decode`),
orders and step schedules (`orders`, `schedules`, `lpd_order`) and per-image random streams
(`row_rng`). It imports models and utilities, never strategies or drivers."""
