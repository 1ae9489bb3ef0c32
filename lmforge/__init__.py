"""lmforge: a language model from raw text to an aligned, compressed, served model."""

import logging as _logging

__version__ = "0.1.0"

# torchao (the `quant` extra), once installed, is imported by transformers whenever a model
# class is: it logs that its CUDA-only extensions do not load on a CPU build, and torch logs
# that torchao registers an enum the deprecated way. Neither is actionable, and both would
# break every command's one-line error on stderr, so they are quieted before torch loads.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
