"""S0 adaptive-slim (being written)."""
