"""The one path layer: every file the project reads or writes goes through these functions.

A path is a string. A local path goes to Python's `os` and `open`, exactly as before; a URI (`gs://bucket/run`,
or any scheme etils.epath knows: s3://, az://) goes to etils.epath, which uses tf.io.gfile (TensorFlow's GCS
client) when TensorFlow is installed, as it is here. Orbax and TensorStore, and TensorFlow's own writers
(TensorBoard event files, the tf.data iterator checkpoint), take the same strings and speak gs:// themselves.

What a plain `os.path` call gets wrong on a URI, and this layer does not: `os.path.abspath('gs://b/r')` is
'<cwd>/gs:/b/r' (so is `epath.Path('gs://b/r').absolute()`), and `os.makedirs('gs://b/r')` makes a local
folder named `gs:`.
"""

import builtins
import contextlib
import os
import posixpath
import uuid
from typing import IO, Iterator

_URI = '://'


def is_remote(path: str) -> bool:
  """True for a URI such as gs://bucket/dir (anything with a scheme), False for a local path."""
  return _URI in os.fspath(path)


def _epath(path: str):
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(os.fspath(path))


def join(path: str, *parts: str) -> str:
  path = os.fspath(path)
  return posixpath.join(path, *parts) if is_remote(path) else os.path.join(path, *parts)


def absolute(path: str) -> str:
  """A local path made absolute; a URI unchanged."""
  path = os.fspath(path)
  return path.rstrip('/') if is_remote(path) else os.path.abspath(path)


def basename(path: str) -> str:
  path = os.fspath(path)
  return posixpath.basename(path.rstrip('/')) if is_remote(path) else os.path.basename(path)


def dirname(path: str) -> str:
  path = os.fspath(path)
  return posixpath.dirname(path.rstrip('/')) if is_remote(path) else os.path.dirname(path)


def exists(path: str) -> bool:
  return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def listdir(path: str) -> list[str]:
  """The names (not paths) of the entries in a folder."""
  if is_remote(path):
    return [p.name for p in _epath(path).iterdir()]
  return os.listdir(path)


def makedirs(path: str) -> None:
  """Creates the folder and its parents; fine if it exists (exist_ok).

  For a URI the bucket must exist: TensorFlow's recursive create asks for a missing bucket again and again
  and never returns, so a mistyped bucket name is a FileNotFoundError here instead.
  """
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)
    return
  target = _epath(path)
  if target.exists():
    return
  scheme, rest = os.fspath(path).split(_URI, 1)
  bucket = f'{scheme}{_URI}{rest.split("/", 1)[0]}/'
  try:
    missing = not _epath(bucket).exists()
  except Exception:  # pylint: disable=broad-except  (e.g. no permission to read the bucket's metadata)
    missing = False  # then TensorFlow's create stops at that error too
  if missing:
    raise FileNotFoundError(f'{bucket} does not exist (no such bucket, or not visible with these credentials)')
  target.mkdir(parents=True, exist_ok=True)


def open(path: str, mode: str = 'r', encoding: str | None = None) -> IO:  # pylint: disable=redefined-builtin
  """Like the built-in open, for local paths and URIs. Mode 'x' (create, never overwrite) on a URI checks
  for the object first: object stores have no exclusive create through this client."""
  if not is_remote(path):
    return builtins.open(path, mode, encoding=encoding)
  if 'x' in mode:
    if exists(path):
      raise FileExistsError(f'{path} already exists')
    mode = mode.replace('x', 'w')
  return _epath(path).open(mode, encoding=encoding)


def read_text(path: str) -> str:
  with open(path) as f:
    return f.read()


def write_text(path: str, text: str) -> None:
  with open(path, 'w') as f:
    f.write(text)


def rename(source: str, target: str) -> None:
  """Renames a file or a folder (on GCS: copies every object under it, then deletes the originals)."""
  if is_remote(source):
    _epath(source).rename(target)
  else:
    os.rename(source, target)


def remove(path: str) -> None:
  if is_remote(path):
    _epath(path).unlink()
  else:
    os.remove(path)


@contextlib.contextmanager
def probe_file(directory: str) -> Iterator[None]:
  """Writes a small uniquely named file in `directory` and removes it on exit (a writability check; every
  process of a multi-host run may probe the same folder at once)."""
  path = join(directory, f'.write-check-{uuid.uuid4().hex}')
  with open(path, 'wb') as f:
    f.write(b'x')
    f.flush()
  try:
    yield
  finally:
    with contextlib.suppress(OSError):
      remove(path)
