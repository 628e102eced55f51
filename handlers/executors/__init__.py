"""Executors: one thread (or stream set) that runs stage sessions; the base class, CPU and CUDA."""
