"""Tokenizers: `base` (the interface), `fixed` (grey levels, pixel patches), `build` (a tokenizer from its
config section)."""
