"""Everything that speaks HTTP: blueprints, schemas, hooks and formats (never torch)."""
