"""callbacks/strategies."""
