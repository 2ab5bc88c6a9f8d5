"""Paths that may be local or URIs (s3://, gs://, ...), through pyarrow.fs.

Writes are made to look atomic: local files are written beside their target and
renamed into place; object stores have no rename, but a PUT is all-or-nothing,
so a reader never sees half of a file either way.
"""

from __future__ import annotations

import concurrent.futures
import os
import posixpath
import uuid
from typing import Optional

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def is_uri(path: str) -> bool:
    return "://" in path


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_uri(base) else os.path.join(base, *parts)


def exists(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def makedirs(path: str) -> None:
    fs, p = resolve(path)
    fs.create_dir(p, recursive=True)


def read_bytes(path: str) -> bytes:
    fs, p = resolve(path)
    with fs.open_input_stream(p, compression=None) as fh:
        return fh.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
    fs, p = resolve(path)
    parent = posixpath.dirname(p) if is_uri(path) else os.path.dirname(p)
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    else:
        with fs.open_output_stream(p) as fh:
            fh.write(data)


def open_output(path: str):
    """A stream that writes `path` from its start (its folder is made): for files written piece by piece."""
    fs, p = resolve(path)
    fs.create_dir(posixpath.dirname(p) if is_uri(path) else os.path.dirname(p), recursive=True)
    return fs.open_output_stream(p, compression=None)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def list_files(path: str, suffix: Optional[str] = None) -> list[str]:
    """Names (not paths) of the files directly inside `path`, sorted; [] if it is absent."""
    fs, p = resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=False))
    names = [posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File]
    return sorted(n for n in names if suffix is None or n.endswith(suffix))


def delete_file(path: str) -> None:
    fs, p = resolve(path)
    if fs.get_file_info(p).type == pafs.FileType.File:
        fs.delete_file(p)


def delete_dir(path: str) -> None:
    fs, p = resolve(path)
    if fs.get_file_info(p).type == pafs.FileType.Directory:
        fs.delete_dir(p)


def read_parquet_files(folder: str, names: list[str], columns: Optional[list[str]] = None) -> pa.Table:
    """The named Parquet files of a folder as one table, in the order given.

    Several files are read at once: decoding runs outside the GIL, and an object store's
    latency is paid once per batch of files rather than once per file."""
    if not names:
        raise ValueError(f"{folder}: no Parquet files to read")

    def read(name: str) -> pa.Table:
        fs, path = resolve(join(folder, name))
        return pq.read_table(path, filesystem=fs, columns=columns, use_threads=False)

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(names))) as pool:
        return pa.concat_tables(list(pool.map(read, names)))


def check_uri(uri: str, key: str, *, fsspec_too: bool = False) -> None:
    """One line naming `key` when the object store behind `uri` cannot be used, before anything starts: a
    scheme no filesystem serves, a bucket that does not exist, credentials the store refuses, an endpoint
    that does not answer. `fsspec_too`: the path is also written through fsspec (DCP's checkpoints), whose
    package for the scheme must be installed.

    The store is found the standard way (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... for s3://), as every
    client in the job finds it.
    """
    from dpo.errors import UserError

    scheme, _, rest = uri.partition("://")
    where = f" at {os.environ['AWS_ENDPOINT_URL']}" if scheme == "s3" and os.environ.get("AWS_ENDPOINT_URL") else ""
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError) as exc:
        raise UserError(f"{key}: {uri}: no filesystem serves {scheme}:// ({exc}); use s3://, gs://, hdfs:// or a "
                        "local path") from None
    except OSError as exc:  # S3's asks the store for the bucket's region
        raise UserError(f"{key}: {uri}: {_store_refusal(scheme, str(exc), where)}") from None
    if fsspec_too:
        _check_fsspec(scheme, uri, key)
    if path.startswith("/"):  # a filesystem with folders from its root (file://, hdfs://), not buckets
        return
    bucket = path.split("/", 1)[0]
    try:
        found = fs.get_file_info(bucket).type != pafs.FileType.NotFound
    except OSError as exc:
        raise UserError(f"{key}: {uri}: {_store_refusal(scheme, str(exc), where)}") from None
    if not found:
        raise UserError(f"{key}: {uri}: the bucket {bucket} does not exist{where}; create it, or fix the URI")


def _store_refusal(scheme: str, message: str, where: str) -> str:
    """What the user can do about an object store's error, in a few words, with the store's own message."""
    first = message.strip().splitlines()[0] if message.strip() else message
    if "NETWORK_CONNECTION" in message or "Could not connect" in message or "Couldn't resolve" in message:
        fix = ("nothing answers" + (where or " at the store's endpoint") + "; check AWS_ENDPOINT_URL and that the "
               "store is up" if scheme == "s3" else "the store does not answer; check its address and network")
    elif any(word in message for word in ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId",
                                          "SignatureDoesNotMatch", "HTTP status 403")):
        # S3 answers a HEAD with a bare 403 for an unknown key, a wrong secret and a key without the right alike.
        fix = ("the store refused this job's credentials" + where + "; check AWS_ACCESS_KEY_ID and "
               "AWS_SECRET_ACCESS_KEY (or the profile they come from) and that they may use the bucket"
               if scheme == "s3" else "the store refused this job's credentials; check them and their rights")
    else:
        fix = "the store answered with an error" + where
    return f"{fix} ({first})"


def _check_fsspec(scheme: str, uri: str, key: str) -> None:
    from dpo.errors import UserError

    try:
        import fsspec

        fsspec.get_filesystem_class(scheme)
    except ImportError as exc:
        raise UserError(f"{key}: {uri}: checkpoints are written through fsspec, which needs a package for "
                        f"{scheme}:// ({exc})") from None
    except ValueError as exc:
        raise UserError(f"{key}: {uri}: checkpoints are written through fsspec, which knows no {scheme}:// "
                        f"({exc})") from None
