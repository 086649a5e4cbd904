"""PyTorch checkpoints -> Flax variables. Each module maps one layout."""
