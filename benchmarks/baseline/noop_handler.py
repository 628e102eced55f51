"""The frontend's ceiling: a handler that does no work.

It answers every request of a batch with a fixed 4,000-byte reply (a 1,000-class float32 output,
what the classifiers answer) without decoding the body, so a sweep against it measures what
TorchServe's frontend, its batching and the worker protocol can carry with the same request
bodies and workers as a real row: a served rate above it is impossible.
"""

REPLY = bytes(4000)


def handle(data, context):
    if data is None:  # TorchServe's initialize call of a function handler
        return None
    return [REPLY] * len(data)
