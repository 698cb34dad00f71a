"""Uploads a directory tree to s3://BUCKET/PREFIX (creating the bucket) for the loader benchmark; uses the AWS_*
environment (AWS_ENDPOINT_URL for moto on 127.0.0.1)."""

import os
import sys
from pathlib import Path

import boto3


def main() -> None:
    src, bucket, prefix = Path(sys.argv[1]), sys.argv[2], sys.argv[3].strip("/")
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    if bucket not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
        s3.create_bucket(Bucket=bucket)
    for p in sorted(src.rglob("*")):
        if p.is_file() and ".ingest" not in p.parts:
            s3.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(src).as_posix()}")


if __name__ == "__main__":
    main()
