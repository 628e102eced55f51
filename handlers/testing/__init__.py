"""Test support that ships with the runtime but is refused unless HETSERVE_ENABLE_FAULTS=1."""
