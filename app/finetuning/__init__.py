"""app/finetuning."""
