"""Arrow data plane: schema, readers, and tensor conversion."""
