"""datamodules/data."""
