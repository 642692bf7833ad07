"""app/tune."""
