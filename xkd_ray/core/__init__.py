"""The method itself: models, losses, methods, metrics, faithfulness, explanations and the
training loops. Pure torch; never imports Ray (``lint-imports`` checks it)."""
