"""callbacks/compression."""
