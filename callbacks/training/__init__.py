"""callbacks/training."""
