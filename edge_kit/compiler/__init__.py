"""Host-side compiler: one model in, a checked, measured and recorded variant per device profile out."""
