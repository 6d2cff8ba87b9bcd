"""Statistics, reports, probes and plots; everything here reads stored results or runs probes."""
