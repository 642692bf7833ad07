"""callbacks/runtime."""
