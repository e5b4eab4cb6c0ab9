"""The torch wing: models, training, validation, in-process runs, ground truth.

Nothing outside this folder imports torch. This package file imports nothing, so a
torch-free process (the aggregator) can use the torch-free parts (the worker protocol
in ``worker``).
"""
