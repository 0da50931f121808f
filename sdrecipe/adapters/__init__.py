"""Adapters (LoRA, LyCORIS, PEFT LoRA): reading them as differences over a
checkpoint's keys, and extracting a LoRA from a difference.

`modules` parses an adapter file's keys into modules, `naming` maps a
checkpoint key forward to the module names adapters give it, `deltas` holds
each algorithm's formula, `extract` the SVD that makes a LoRA.
"""
