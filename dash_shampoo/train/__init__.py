"""The training command: token data (:mod:`.data`), the options, optimizers, loop and comparison
(:mod:`.trainer`), devices, ranks, progress, memory and checkpoints (:mod:`.runtime`) and the result
files (:mod:`.report`); the model is :mod:`dash_shampoo.models`. Run ``dash-shampoo train`` or
``python -m dash_shampoo.train``."""
