"""Scale: the device mesh, logical-axis sharding rules, batch placement, multi-process start."""
