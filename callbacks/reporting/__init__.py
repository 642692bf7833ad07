"""callbacks/reporting."""
