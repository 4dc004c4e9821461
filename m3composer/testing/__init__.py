"""Helpers for tests and benchmarks: a moto S3 server and a fault-injecting proxy (`testing.s3`), disk usage
of a cache (`testing.disk`), the dataset's settings at the schema's defaults (`testing.settings`)."""
