"""Tokenizers: `base` (the interface every tokenizer implements), `fixed` (grey levels and pixel patches),
`nets` and `learned` (the convolutional autoencoders and quantisers of vq, fsq, lfq and kl, and pretrained
diffusers VAEs), `trainconfig` and `train` (`isynth tokenizer train`), `store` (the directory manifest),
`build` (a tokenizer from a run's `tokenizer` section) and `command` (the CLI group)."""
