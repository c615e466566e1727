"""cluster: config, the Serve app builder, the CLI, the local launcher, autoscaling and status."""
