"""Request and response bodies: one codec per body format, KServe v2, shared validation."""
