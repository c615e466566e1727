"""Load tooling: seeded workloads (workloads), the async streaming load client (client, metrics,
sampler, target), reports with plots (report), the standard suite (suite) and the CLI (__main__)."""
