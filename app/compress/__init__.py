"""app/compress."""
