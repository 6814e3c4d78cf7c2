"""Training: the loop and its hooks, the jitted step, optimizer, checkpoints, metrics, evaluation, regularisers."""
