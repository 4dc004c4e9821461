"""m3composer/testing/s3.py: the fault-injecting proxy forwards S3 faithfully, fails what it is told
to (deterministically under a seed), can be changed while it runs, and botocore retries its errors."""
from __future__ import annotations

import os

import pytest

from m3composer.testing.s3 import FaultProxy, MotoS3

PAYLOAD = os.urandom(300_000)


@pytest.fixture(scope="module")
def moto():
    with MotoS3("proxytest") as server:
        server.client.put_object(Bucket=server.bucket, Key="data/blob", Body=PAYLOAD)
        yield server


def client(endpoint: str, attempts: int = 1):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing",
                        config=Config(retries={"mode": "standard", "total_max_attempts": attempts},
                                      connect_timeout=5, read_timeout=10))


def status_of(err) -> int:
    return err.value.response["ResponseMetadata"]["HTTPStatusCode"]


def test_a_clean_proxy_forwards_reads_writes_and_heads(moto):
    from botocore.exceptions import ClientError

    with FaultProxy(moto.url) as proxy:
        s3 = client(proxy.url)
        s3.put_object(Bucket=moto.bucket, Key="data/copy", Body=PAYLOAD[::-1])
        assert s3.get_object(Bucket=moto.bucket, Key="data/blob")["Body"].read() == PAYLOAD
        assert s3.head_object(Bucket=moto.bucket, Key="data/copy")["ContentLength"] == len(PAYLOAD)
        with pytest.raises(ClientError) as missing:          # upstream errors pass through unchanged
            s3.head_object(Bucket=moto.bucket, Key="data/absent")
        assert status_of(missing) == 404
        assert (proxy.requests, proxy.failed) == (4, 0)
    assert moto.client.get_object(Bucket=moto.bucket, Key="data/copy")["Body"].read() == PAYLOAD[::-1]
    assert [h[:2] for h in proxy.history][:2] == [("PUT", "/proxytest/data/copy"), ("GET", "/proxytest/data/blob")]


def test_failures_follow_the_seed_and_botocore_retries_them(moto):
    from botocore.exceptions import ClientError

    statuses = []
    for _ in range(2):
        with FaultProxy(moto.url, fail_fraction=0.5, fail_status=503, seed=7) as proxy:
            s3 = client(proxy.url)
            for _ in range(20):
                try:
                    s3.head_object(Bucket=moto.bucket, Key="data/blob")
                except ClientError as err:
                    assert err.response["ResponseMetadata"]["HTTPStatusCode"] == 503
            statuses.append([h[2] for h in proxy.history])
            assert proxy.failed == statuses[-1].count(503)
    assert statuses[0] == statuses[1] and 3 < statuses[0].count(503) < 17   # same seed, same failures

    with FaultProxy(moto.url, fail_fraction=0.3, seed=3) as proxy:
        s3 = client(proxy.url, attempts=20)
        for _ in range(5):
            assert s3.get_object(Bucket=moto.bucket, Key="data/blob")["Body"].read() == PAYLOAD
        assert proxy.failed > 0 and proxy.requests == 5 + proxy.failed   # every failure was retried


def test_settings_change_while_running_down_after_and_fail_match(moto):
    from botocore.exceptions import ClientError

    with FaultProxy(moto.url, fail_match=r"/blob$") as proxy:
        s3 = client(proxy.url)
        s3.head_object(Bucket=moto.bucket, Key="data/blob")
        proxy.down_after = proxy.requests                       # the store goes down now
        with pytest.raises(ClientError) as down:
            s3.get_object(Bucket=moto.bucket, Key="data/blob")
        assert status_of(down) == 503
        s3.head_object(Bucket=moto.bucket, Key="data/copy")     # not matched: still served
        proxy.fail_match = None
        with pytest.raises(ClientError):
            s3.head_object(Bucket=moto.bucket, Key="data/copy")
        proxy.down_after, proxy.fail_fraction, proxy.fail_status = None, 1.0, 500
        with pytest.raises(ClientError) as failing:
            s3.head_object(Bucket=moto.bucket, Key="data/blob")
        assert status_of(failing) == 500
        proxy.fail_fraction = 0.0                                # back up
        assert s3.get_object(Bucket=moto.bucket, Key="data/blob")["Body"].read() == PAYLOAD
        assert (proxy.requests, proxy.failed) == (6, 3)


def test_refuses_an_upstream_off_this_machine():
    with pytest.raises(ValueError, match="127.0.0.1"):
        FaultProxy("http://example.com:9000")
