"""The training command: a Llama-style model (:mod:`.model`), token data (:mod:`.data`), the loop and
comparison (:mod:`.trainer`) and the result files (:mod:`.report`). Run ``dash-shampoo train`` or
``python -m dash_shampoo.train``."""
