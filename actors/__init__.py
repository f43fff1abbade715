"""What runs inside the actor pool: loading, task heads, batching, the predictor."""
