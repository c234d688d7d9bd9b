"""MLflow tracking: the buffered, outage-tolerant tracker and the plots it logs."""
