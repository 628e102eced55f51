"""The micro-batch flow and what it needs: placement, scheduling policy, performance history,
its configuration, and building it from a manifest."""
