"""Benchmarks (``dash-shampoo bench roots|step|dist``): the solver study, step and multi-process timings."""
