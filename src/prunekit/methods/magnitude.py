"""S4 magnitude (being written)."""
