"""Copies every object under s3://BUCKET/PREFIX to a local directory with boto3 (endpoint from AWS_ENDPOINT_URL),
so zarr-python can open what radit wrote to S3 exactly as stored."""

import sys
from pathlib import Path

import boto3


def main():
    bucket, prefix, dest = sys.argv[1], sys.argv[2].strip("/"), Path(sys.argv[3])
    s3 = boto3.client("s3")
    count = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix) + 1:]
            path = dest / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, obj["Key"], str(path))
            count += 1
    print(count)


if __name__ == "__main__":
    main()
