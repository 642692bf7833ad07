"""datamodules/streams."""
