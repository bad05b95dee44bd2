"""What a run tells its reader: the run's metrics.json, SUMMARY.md, the figures, the offline
feature browser, and the --dry-run plan. Reads the run folder; imports sae/ and below."""
