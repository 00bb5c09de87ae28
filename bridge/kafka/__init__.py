"""Kafka: the publisher the ingest path writes through (`publisher`), its batching (`batching`) and record
sizes (`sizes`), producer supervision (`producer`), what the metadata says of readiness (`readiness`), the
topics and the connection options (TLS, SASL) every client of the bridge shares. Nothing here imports the
ingest path: the publisher tells a `DeliveryListener` what becomes of the records."""
