"""The ingest path, HTTP to Kafka: the aiohttp application and its runner, admission of callbacks, the edge
dedup, the outcome of every callback, and the metrics."""
