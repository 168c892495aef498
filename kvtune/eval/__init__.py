"""Long-context evaluation: deterministic tasks, scored through compressed caches, as tables and plots."""
