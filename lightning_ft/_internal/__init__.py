"""Internal helpers shared by the technique families (logging, distributed, validation)."""
