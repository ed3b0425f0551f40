"""The ingest service: schemas, datasets, validated batch and streaming ingestion."""
