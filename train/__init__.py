"""ccurate stage package."""
