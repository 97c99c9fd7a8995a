"""The coordinating centre's side of fedseg: ServerApp, strategy, checkpoints and launcher."""
