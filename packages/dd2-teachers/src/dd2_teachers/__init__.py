"""dd2-teachers."""
