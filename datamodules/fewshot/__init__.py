"""datamodules/fewshot."""
