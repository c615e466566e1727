"""The OpenAI API ingress, the request router (replica choice), retries and mid-stream failover, admission control."""
