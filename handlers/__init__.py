"""Serving side of hetserve: the TorchServe handler and the runtime it delegates to.

This package must import without torch: it runs inside TorchServe workers and is copied into
every ``.mar`` so an archive serves on a stock TorchServe with onnxruntime and numpy.
"""
