"""One file per tokenizer kind (`tokenizer/kind.py` is the interface, `tokenizer/registry.py` the list)."""
