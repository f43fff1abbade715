"""What runs inside the actor pool: model loading, task heads, batching, the predictor."""
