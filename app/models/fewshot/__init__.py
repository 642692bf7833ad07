"""app/models/fewshot."""
