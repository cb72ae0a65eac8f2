"""dd2-eval."""
