"""dd2-train."""
