"""What a run tells its reader: metrics.json, SUMMARY.md, the figures, and the --dry-run plan."""
