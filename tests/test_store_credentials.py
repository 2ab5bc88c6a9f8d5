"""Promise: credentials that the object store refuses are one line naming the AWS variables to check, before
Ray starts, for an input and for run.output_dir alike.

The store is moto's S3 server with its credential checks on (conftest.moto_s3, INITIAL_NO_AUTH_ACTION_COUNT):
the first three requests (a user, its access key, a policy letting it do anything) go unchecked, and from then
on a request must be signed by that key, as on S3 or MinIO.
"""

import json
import os

import pytest

from conftest import moto_s3
from dpo.config import load_config

BUCKET = "raydpo-credentials"
PAIR = json.dumps({"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"}) + "\n"
ALLOW_ALL = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})


@pytest.fixture(scope="module")
def checked_store():
    """The server, the AWS variables holding the one key it accepts, a bucket made with that key."""
    import boto3

    with moto_s3(INITIAL_NO_AUTH_ACTION_COUNT="3") as endpoint:
        iam = boto3.client("iam")
        iam.create_user(UserName="trainer")
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        iam.put_user_policy(UserName="trainer", PolicyName="all", PolicyDocument=ALLOW_ALL)
        os.environ.update(AWS_ACCESS_KEY_ID=key["AccessKeyId"], AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"])
        s3 = boto3.client("s3", aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
        s3.create_bucket(Bucket=BUCKET)
        s3.put_object(Bucket=BUCKET, Key="data/a.jsonl", Body=PAIR.encode())
        yield {"endpoint": endpoint, "key": key["AccessKeyId"]}


@pytest.mark.parametrize("credentials", ["the accepted key", "an unknown key", "a wrong secret"])
@pytest.mark.parametrize("where", ["data.train_files", "run.output_dir"])
def test_credentials_the_store_refuses_are_one_line_before_ray_starts(checked_store, tiny_model, tmp_path,
                                                                     monkeypatch, capsys, credentials, where):
    """With the accepted key the check passes (so the refusals are the credentials', not the server's); with a
    key the store does not know, or the right key and a wrong secret (S3 answers both with a bare 403), the job
    stops with one line naming the key, the store and the variables to check, and Ray never starts."""
    from jobs import cli, prepare

    ray_starts = []
    monkeypatch.setattr(cli, "init_ray", lambda *args: ray_starts.append(args))
    if credentials == "an unknown key":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNUNKNOWN00")
    elif credentials == "a wrong secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    inputs = f"s3://{BUCKET}/data/a.jsonl" if where == "data.train_files" else str(tmp_path / "a.jsonl")
    (tmp_path / "a.jsonl").write_text(PAIR)
    output = f"s3://{BUCKET}/run" if where == "run.output_dir" else str(tmp_path / "run")
    config = tmp_path / "c.yaml"
    config.write_text(load_config(None, [f"model.policy={tiny_model}", f"run.output_dir={output}",
                                         f"data.train_files=[{inputs}]", "data.eval_files=[]"]).to_yaml())
    if credentials == "the accepted key":
        cli.check_object_stores(load_config(str(config), []))
        return
    with pytest.raises(SystemExit) as exit_:
        prepare.main(["--config", str(config)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    uri = inputs if where == "data.train_files" else output
    assert len(err) == 1 and err[0].startswith(
        f"error: {where}: {uri}: the store refused this job's credentials at {checked_store['endpoint']}; check "
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or the profile they come from) and that they may use the "
        "bucket ("), err
    assert not ray_starts
