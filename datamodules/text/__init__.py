"""Text streams for causal language models: domains read from files (or Hugging Face
``datasets``), a tokenizer (a folder's, or a byte-level BPE trained on the stream), and token
blocks in two forms (``lm``, ``instruction``). The batch contract with the LM module is in
:mod:`mneme.datamodules.text.stream`.
"""
