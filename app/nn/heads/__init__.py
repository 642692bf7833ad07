"""app/nn/heads."""
