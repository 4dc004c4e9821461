"""Helpers for tests and benchmarks: a moto S3 server and a fault-injecting proxy (`testing.s3`)."""
