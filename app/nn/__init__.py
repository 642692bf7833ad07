"""app/nn."""
